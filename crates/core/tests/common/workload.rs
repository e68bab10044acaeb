//! A guest workload whose state lives in processes and memory: a shell
//! counter writing a file every 50 ms and a Python process holding a value
//! in memory behind a TCP port, both outside the exec's process group.

use std::time::{Duration, Instant};

use bhatti_core::{SandboxId, SandboxManager};
use proto::ExecRequest;

pub fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        timeout_ms: Some(60_000),
        ..Default::default()
    }
}

pub async fn out(mgr: &SandboxManager, id: &SandboxId, script: &str) -> String {
    let o = mgr.exec(id, sh(script)).await.expect("exec");
    assert_eq!(
        o.exit.code,
        0,
        "{script}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// A shell counter and a Python process holding a dict behind a TCP port,
/// both outside the exec's process group.
pub const START_WORKLOAD: &str = r#"
setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done' </dev/null >/dev/null 2>&1 &
echo $! > /tmp/counter.pid
cat > /tmp/dict.py <<'EOF'
import os, socketserver
state = {"token": os.urandom(8).hex(), "hits": 0}
class H(socketserver.StreamRequestHandler):
    def handle(self):
        state["hits"] += 1
        self.wfile.write(("%s %d %d\n" % (state["token"], state["hits"], os.getpid())).encode())
socketserver.TCPServer.allow_reuse_address = True
socketserver.TCPServer(("127.0.0.1", 9000), H).serve_forever()
EOF
setsid python3 /tmp/dict.py </dev/null >/tmp/dict.log 2>&1 &
echo $! > /tmp/dict.pid
"#;

pub const ASK_DICT: &str = "python3 -c 'import socket; s=socket.create_connection((\"127.0.0.1\", 9000)); print(s.makefile().readline().strip())'";

/// (counter pid alive, counter value, dict token, dict hits, dict pid)
pub async fn workload(mgr: &SandboxManager, id: &SandboxId) -> (String, u64, String, u64, String) {
    let pid = out(mgr, id, "p=$(cat /tmp/counter.pid); kill -0 $p && echo $p").await;
    let count: u64 = out(mgr, id, "cat /tmp/count").await.parse().unwrap();
    let answer = out(mgr, id, ASK_DICT).await;
    let parts: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(parts.len(), 3, "{answer}");
    (
        pid,
        count,
        parts[0].to_string(),
        parts[1].parse().unwrap(),
        parts[2].to_string(),
    )
}

pub async fn wait_for_dict(mgr: &SandboxManager, id: &SandboxId) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = mgr.exec(id, sh(ASK_DICT)).await.expect("exec");
        if o.exit.code == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "python server never answered: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
