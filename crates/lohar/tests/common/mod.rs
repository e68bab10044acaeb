//! Test harness: a real `lohar serve` on a Unix socket in a temp dir,
//! driven by the real client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_client::{AgentClient, Endpoint};
use proto::{Auth, Challenge, ExecRequest, FrameReader, FrameWriter, Message, Nonce};
use tokio::net::UnixStream;

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub struct TestAgent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub endpoint: Endpoint,
    pub client: AgentClient,
}

impl TestAgent {
    pub fn start() -> TestAgent {
        Self::start_with(serde_json::json!({}))
    }

    /// Starts an agent with this JSON config (see lohar's `AgentConfig`).
    pub fn start_with(config: serde_json::Value) -> TestAgent {
        Self::start_full(config, false)
    }

    /// Starts an agent that reads identity lines on its stdin (`child.stdin`).
    pub fn start_identity_stdin() -> TestAgent {
        Self::start_full(serde_json::json!({}), true)
    }

    fn start_full(mut config: serde_json::Value, identity_stdin: bool) -> TestAgent {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("token"), TOKEN).unwrap();
        // Keep detached-command logs inside the test's own directory.
        if config.get("detach_log_dir").is_none() {
            config["detach_log_dir"] = serde_json::json!(dir.path());
        }
        if config.get("init_log").is_none() {
            config["init_log"] = serde_json::json!(dir.path().join("init.log"));
        }
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let sock = dir.path().join("agent.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lohar"));
        if identity_stdin {
            cmd.arg("serve")
                .arg("--identity-stdin")
                .stdin(Stdio::piped());
        } else {
            cmd.arg("serve");
        }
        let mut child = cmd
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--token-file")
            .arg(dir.path().join("token"))
            .arg("--config")
            .arg(dir.path().join("config.json"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn lohar");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read LISTENING line");
        assert!(line.starts_with("LISTENING unix:"), "lohar said: {line:?}");
        let endpoint = Endpoint::Unix(sock);
        let client = AgentClient::new(endpoint.clone(), TOKEN);
        TestAgent {
            child,
            dir,
            endpoint,
            client,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A raw, unauthenticated connection for protocol-level tests.
    pub async fn raw(&self) -> Raw {
        let Endpoint::Unix(p) = &self.endpoint else {
            unreachable!()
        };
        let s = UnixStream::connect(p).await.expect("connect");
        let (r, w) = s.into_split();
        Raw {
            reader: FrameReader::new(r),
            writer: FrameWriter::new(w),
        }
    }

    /// A raw connection that has authenticated (and checked the agent's proof).
    pub async fn raw_authed(&self) -> Raw {
        let mut raw = self.raw().await;
        let challenge = raw.challenge().await;
        let auth = raw.answer(&challenge, TOKEN).await;
        match raw.recv().await {
            Some(Message::AuthOk(ok)) => {
                assert!(
                    proto::auth::verify_agent_proof(
                        TOKEN.as_bytes(),
                        &challenge.nonce,
                        &auth.nonce,
                        &ok.proof
                    ),
                    "the agent's proof does not check"
                );
                raw
            }
            other => panic!("auth failed: {other:?}"),
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Raw {
    pub reader: FrameReader<tokio::net::unix::OwnedReadHalf>,
    pub writer: FrameWriter<tokio::net::unix::OwnedWriteHalf>,
}

impl Raw {
    pub async fn send(&mut self, m: Message) {
        self.writer.send(&m).await.expect("send");
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.writer.send_encoded(b).await.expect("send bytes");
    }

    /// The agent's first frame, which must be a challenge.
    pub async fn challenge(&mut self) -> Challenge {
        match self.recv().await {
            Some(Message::Challenge(c)) => c,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    /// Answers `challenge` as a host holding `token` would; returns what it sent.
    pub async fn answer(&mut self, challenge: &Challenge, token: &str) -> Auth {
        let nonce = Nonce::random().expect("nonce");
        let auth = Auth {
            version: proto::PROTOCOL_VERSION,
            nonce,
            proof: proto::auth::host_proof(token.as_bytes(), &challenge.nonce, &nonce),
        };
        self.send(Message::Auth(auth.clone())).await;
        auth
    }

    /// The next message, `None` once the agent closed the connection.
    pub async fn recv(&mut self) -> Option<Message> {
        tokio::time::timeout(Duration::from_secs(20), self.reader.read_message())
            .await
            .expect("agent answered in time")
            .ok()
            .flatten()
    }
}

pub fn argv(args: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn sh(script: &str) -> ExecRequest {
    argv(&["sh", "-c", script])
}

/// Polls `cond` until it holds or the deadline passes (then panics naming `what`).
pub async fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// Zombie children of `parent`.
pub fn zombies_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let rest: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if rest.len() > 1 && rest[0] == "Z" && rest[1] == parent.to_string() {
            out.push(pid);
        }
    }
    out
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
