//! The image tiers, used the way an agent uses them, on real VMs (one each):
//! in `minimal`, a venv and `pip install` from an HTTP index, `npm install`
//! of a package tarball, and a C program built with gcc; in `browser`,
//! Playwright's headless Chromium loading a page and printing its title; in
//! `docker`, `docker load` of an image tar the test makes and `docker run`
//! of it, on Docker's default bridge network. Nothing leaves the sandbox:
//! every server is in the guest (on its loopback, or its docker bridge), the
//! wheel, the npm package and the page are made in the guest, the image tar
//! on the host from the `tiny` tier's busybox.

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;

/// Runs `script` with `sh -c` as the sandbox's user, allowing `secs` (the
/// HTTP request too: the client's default is shorter than a browser's
/// start under TCG when other VMs share the cores).
async fn run(c: &Client, sandbox: &str, script: &str, secs: u64) -> String {
    let resp = c
        .req(Method::POST, &format!("/sandboxes/{sandbox}/exec"))
        .timeout(std::time::Duration::from_secs(secs + 60))
        .json(&json!({"cmd": ["sh", "-c", script], "timeout_sec": secs}))
        .send()
        .await
        .expect("exec request");
    let s = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.expect("exec answer");
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
    let test_started = std::time::Instant::now();
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
    println!("TIMING minimal test total: {:?}", test_started.elapsed());
}

#[test]
fn browser_runs_headless_chromium_through_playwright() {
    let test_started = std::time::Instant::now();
    in_netns("tiers-web", || async {
        let started = std::time::Instant::now();
        testkit::images(image::Tier::Browser);
        println!("TIMING browser image ready: {:?}", started.elapsed());
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let c = d.client(&d.user("alice", 5));
        let started = std::time::Instant::now();
        let (s, v) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "web", "image": "browser", "memory_mb": 1536})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        println!("TIMING browser create: {:?}", started.elapsed());

        // A page served inside the guest, on its loopback.
        run(
            &c,
            "web",
            "mkdir -p /tmp/site && \
             printf '<html><head><title>bhatti browser tier</title></head><body>hi</body></html>' \
               > /tmp/site/index.html && \
             (setsid python3 -m http.server 8766 --bind 127.0.0.1 -d /tmp/site \
                </dev/null >/tmp/http.log 2>&1 &) && \
             for i in $(seq 50); do curl -fsS http://127.0.0.1:8766/ >/dev/null 2>&1 && exit 0; sleep 0.2; done; \
             cat /tmp/http.log; exit 1",
            60,
        )
        .await;
        // Playwright with its defaults (no executable path given): the
        // tier set it up to find the system Chromium.
        let script = r#"
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    b = p.chromium.launch(timeout=300000)
    page = b.new_page()
    page.goto("http://127.0.0.1:8766/", timeout=300000)
    print(page.title())
    print(page.evaluate("navigator.userAgent.includes('Chrome')"))
    b.close()
"#;
        let put = c
            .req(Method::PUT, "/sandboxes/web/files?path=/tmp/title.py")
            .body(script)
            .send()
            .await
            .unwrap();
        assert_eq!(put.status().as_u16(), 200);
        let started = std::time::Instant::now();
        let out = run(
            &c,
            "web",
            "python3 /tmp/title.py 2>/tmp/pw.log || { cat /tmp/pw.log; exit 1; }",
            900,
        )
        .await;
        println!("TIMING browser playwright run: {:?}", started.elapsed());
        assert_eq!(out, "bhatti browser tier\nTrue\n");
        d.stop().await;
    });
    println!("TIMING browser test total: {:?}", test_started.elapsed());
}

/// A docker-archive (what `docker save` writes) of one layer holding the
/// static busybox at `busybox`, tagged `bhatti/hello:1`, whose default
/// command prints a line: made by hand with Python's tarfile.
fn docker_archive(busybox: &std::path::Path, out: &std::path::Path) {
    const MAKE: &str = r#"
import hashlib, io, json, sys, tarfile
busybox, out = sys.argv[1], sys.argv[2]
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
    d = tarfile.TarInfo("bin"); d.type = tarfile.DIRTYPE; d.mode = 0o755
    t.addfile(d)
    data = open(busybox, "rb").read()
    f = tarfile.TarInfo("bin/busybox"); f.size = len(data); f.mode = 0o755
    t.addfile(f, io.BytesIO(data))
    for name in ["sh", "echo", "wget", "cat"]:
        l = tarfile.TarInfo("bin/" + name); l.type = tarfile.SYMTYPE; l.linkname = "busybox"
        t.addfile(l)
layer = layer.getvalue()
diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
config = json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Cmd": ["/bin/echo", "hello from a docker container"], "Env": ["PATH=/bin"]},
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
}).encode()
config_name = hashlib.sha256(config).hexdigest() + ".json"
manifest = json.dumps([{"Config": config_name, "RepoTags": ["bhatti/hello:1"],
                        "Layers": ["layer/layer.tar"]}]).encode()
with tarfile.open(out, "w") as t:
    for name, data in [("layer/layer.tar", layer), (config_name, config), ("manifest.json", manifest)]:
        i = tarfile.TarInfo(name); i.size = len(data); i.mode = 0o644
        t.addfile(i, io.BytesIO(data))
"#;
    testkit::run(
        "python3",
        &[
            "-c",
            MAKE,
            &busybox.display().to_string(),
            &out.display().to_string(),
        ],
    );
}

#[test]
fn docker_runs_a_loaded_image_inside_the_sandbox() {
    let test_started = std::time::Instant::now();
    in_netns("tiers-dock", || async {
        let started = std::time::Instant::now();
        testkit::images(image::Tier::Docker);
        println!("TIMING docker image ready: {:?}", started.elapsed());
        // The image tar: busybox out of the tiny tier's rootfs (debugfs
        // reads our own image file; nothing of a guest's is parsed here).
        let tiny = testkit::images(image::Tier::Tiny);
        let work = tempfile::tempdir().unwrap();
        let busybox = work.path().join("busybox");
        testkit::run(
            "debugfs",
            &[
                "-R",
                &format!("dump /bin/busybox {}", busybox.display()),
                &tiny.rootfs.display().to_string(),
            ],
        );
        assert!(
            busybox.metadata().unwrap().len() > 100_000,
            "busybox dumped"
        );
        let tar = work.path().join("hello.tar");
        docker_archive(&busybox, &tar);

        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let c = d.client(&d.user("alice", 5));
        let started = std::time::Instant::now();
        let (s, v) = c
            .json(
                Method::POST,
                "/sandboxes",
                // The image's boot service starts dockerd, then runs the
                // sandbox's own init.
                Some(json!({"name": "dock", "image": "docker", "memory_mb": 1024,
                            "init": "echo user init ran > /tmp/user-init.txt; exec sleep infinity"})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        println!("TIMING docker create: {:?}", started.elapsed());
        let started = std::time::Instant::now();
        run(
            &c,
            "dock",
            "for i in $(seq 240); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done; \
             tail -40 /var/log/bhatti-init.log; exit 1",
            300,
        )
        .await;
        println!("TIMING dockerd ready after create: {:?}", started.elapsed());
        // The sandbox user is in the docker group; dockerd is root's,
        // started by the boot service, its data on the sandbox disk.
        let out = run(
            &c,
            "dock",
            "cat /tmp/user-init.txt; id -nG; ps -o user=,comm= -C dockerd; \
             docker info --format '{{.Driver}} {{.CgroupVersion}}'; \
             if grep -q 'did not load' /var/log/bhatti-init.log; then \
               cat /var/log/bhatti-init.log; exit 1; fi",
            60,
        )
        .await;
        assert!(out.starts_with("user init ran\n"), "{out}");
        let groups = out.lines().nth(1).unwrap_or_default();
        assert!(groups.split_whitespace().any(|g| g == "docker"), "{out}");
        assert!(
            out.contains("root     dockerd") || out.contains("root dockerd"),
            "{out}"
        );
        assert!(out.trim_end().ends_with("overlay2 2"), "{out}");

        let put = c
            .req(Method::PUT, "/sandboxes/dock/files?path=/tmp/hello.tar")
            .body(std::fs::read(&tar).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(put.status().as_u16(), 200);
        let started = std::time::Instant::now();
        let out = run(&c, "dock", "docker load -i /tmp/hello.tar", 300).await;
        assert!(out.contains("Loaded image: bhatti/hello:1"), "{out}");
        let out = run(&c, "dock", "docker run --rm bhatti/hello:1 2>&1", 300).await;
        assert_eq!(out, "hello from a docker container\n");
        println!("TIMING docker load + run: {:?}", started.elapsed());

        // Default (bridge) networking: the container reaches a server in
        // the guest through docker0 (veth, bridge, NAT rules all loaded).
        let out = run(
            &c,
            "dock",
            "mkdir -p /tmp/site && echo served-to-a-container > /tmp/site/index.html && \
             (setsid python3 -m http.server 8767 --bind 0.0.0.0 -d /tmp/site \
                </dev/null >/tmp/http.log 2>&1 &) && \
             for i in $(seq 50); do curl -fsS http://127.0.0.1:8767/ >/dev/null 2>&1 && break; sleep 0.2; done; \
             gw=$(ip -4 -o addr show dev docker0 | awk '{print $4}' | cut -d/ -f1) && [ -n \"$gw\" ] && \
             docker run --rm bhatti/hello:1 wget -qO- http://$gw:8767/index.html 2>&1",
            300,
        )
        .await;
        assert_eq!(out, "served-to-a-container\n");
        d.stop().await;
    });
    println!("TIMING docker test total: {:?}", test_started.elapsed());
}
