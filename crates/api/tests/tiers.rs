//! The image tiers, used the way an agent uses them, on real VMs: in
//! `minimal`, a venv and `pip install` from an HTTP index, `npm install` of
//! a package tarball, and a C program built with gcc. Nothing leaves the
//! sandbox: the index is an HTTP server in the guest on its loopback, the
//! wheel and the npm package are made in the guest.

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;

/// Runs `script` with `sh -c` as the sandbox's user, allowing `secs`.
async fn run(c: &Client, sandbox: &str, script: &str, secs: u64) -> String {
    let (s, v) = c
        .json(
            Method::POST,
            &format!("/sandboxes/{sandbox}/exec"),
            Some(json!({"cmd": ["sh", "-c", script], "timeout_sec": secs})),
        )
        .await;
    assert_eq!(s, 200, "{script}: {v}");
    assert_eq!(v["exit_code"], 0, "{script}: {v}");
    v["stdout"].as_str().unwrap_or_default().to_string()
}

/// Writes a wheel of the pure-Python package `hello_bhatti` 1.0 into
/// `dir` (a wheel is a zip with the module, METADATA, WHEEL and RECORD).
const MAKE_WHEEL: &str = r#"
import base64, hashlib, os, sys, zipfile
d = sys.argv[1]
os.makedirs(d, exist_ok=True)
files = {
    "hello_bhatti/__init__.py": "def greet():\n    return 'hello from a wheel'\n",
    "hello_bhatti-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: hello-bhatti\nVersion: 1.0\n",
    "hello_bhatti-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: bhatti-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(os.path.join(d, "hello_bhatti-1.0-py3-none-any.whl"), "w") as z:
    for name, text in files.items():
        data = text.encode()
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("hello_bhatti-1.0.dist-info/RECORD,,")
    z.writestr("hello_bhatti-1.0.dist-info/RECORD", "\n".join(record) + "\n")
"#;

#[test]
fn minimal_is_ready_for_pip_npm_and_gcc() {
    in_netns("tiers-min", || async {
        testkit::images(image::Tier::Minimal);
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let c = d.client(&d.user("alice", 5));
        let (s, v) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "agent", "image": "minimal", "memory_mb": 1024})),
            )
            .await;
        assert_eq!(s, 201, "{v}");

        // The tools an agent reaches for first.
        let missing = run(
            &c,
            "agent",
            "for t in python3 pip3 node npm gcc make git curl zip unzip jq rg less vi ssh; do \
               command -v $t >/dev/null || echo missing-$t; done",
            60,
        )
        .await;
        assert_eq!(missing, "", "tools missing from minimal");

        // pip in a venv, from an HTTP index (a directory listing served by
        // the guest on its loopback; --no-index: nothing else is asked).
        let put = c
            .req(
                Method::PUT,
                "/sandboxes/agent/files?path=/tmp/make_wheel.py",
            )
            .body(MAKE_WHEEL)
            .send()
            .await
            .unwrap();
        assert_eq!(put.status().as_u16(), 200);
        run(
            &c,
            "agent",
            "python3 /tmp/make_wheel.py /tmp/wheels && \
             (setsid python3 -m http.server 8765 --bind 127.0.0.1 -d /tmp/wheels \
                </dev/null >/tmp/http.log 2>&1 &) && \
             for i in $(seq 50); do curl -fsS http://127.0.0.1:8765/ >/dev/null 2>&1 && exit 0; sleep 0.2; done; \
             cat /tmp/http.log; exit 1",
            60,
        )
        .await;
        let out = run(
            &c,
            "agent",
            "cd /tmp && python3 -m venv v && \
             v/bin/pip install --no-index --find-links http://127.0.0.1:8765/ hello-bhatti >/tmp/pip.log 2>&1 \
               || { cat /tmp/pip.log; exit 1; } && \
             v/bin/python -c 'import hello_bhatti; print(hello_bhatti.greet())'",
            600,
        )
        .await;
        assert_eq!(out, "hello from a wheel\n");

        // npm: pack a package, install the tarball offline, require it.
        let out = run(
            &c,
            "agent",
            r#"set -e
mkdir -p /tmp/pkg /tmp/app && cd /tmp/pkg
printf '{"name":"hello-bhatti","version":"1.0.0","main":"index.js"}\n' > package.json
printf 'exports.greet = () => "hello from npm";\n' > index.js
npm pack --silent >/dev/null
cd /tmp/app && printf '{"name":"app","version":"1.0.0"}\n' > package.json
npm install --offline --no-audit --no-fund --silent /tmp/pkg/hello-bhatti-1.0.0.tgz
node -e 'console.log(require("hello-bhatti").greet())'"#,
            600,
        )
        .await;
        assert_eq!(out, "hello from npm\n");

        // gcc builds and runs a C program.
        let out = run(
            &c,
            "agent",
            r#"set -e
cd /tmp && cat > h.c <<'END'
#include <stdio.h>
int main(void) { printf("%d\n", 6 * 7); return 0; }
END
gcc -O1 -o h h.c && ./h"#,
            300,
        )
        .await;
        assert_eq!(out, "42\n");
        d.stop().await;
    });
}
