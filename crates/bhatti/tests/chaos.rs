//! Chaos: a workload of create / exec / write file / stop / start /
//! destroy against `bhatti serve` (a child process, real QEMU-TCG VMs),
//! while the daemon is killed with SIGKILL at random moments and started
//! again, at least 20 times. After every restart nothing may run or lie on
//! disk that no row owns; at the end every listed sandbox either works
//! with its acknowledged files intact, or is cleanly stopped or failed and
//! destroyable.
//!
//! The seed is printed; `BHATTI_CHAOS_SEED` replays one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use image::Tier;
use serde_json::{json, Value};
use testkit::{wait_until, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");
const KILLS: usize = 20;
/// At most this many sandboxes at a time.
const MAX_SANDBOXES: usize = 3;

/// xorshift64*: enough randomness for a schedule, and replayable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One `bhatti serve` process.
struct Serve {
    child: Child,
    url: String,
}

fn start_daemon(data: &Path, config: &Path, round: usize) -> Serve {
    let log = data.join(format!("serve-{round}.log"));
    let err = data.join(format!("serve-{round}.err"));
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawning bhatti serve");
    let mut url = String::new();
    wait_until(
        "bhatti serve says where it listens",
        Duration::from_secs(180),
        || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "bhatti serve exited ({st}): {}",
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            match text.lines().find_map(|l| l.split("serving on ").nth(1)) {
                Some(u) => {
                    url = u.trim().to_string();
                    true
                }
                None => false,
            }
        },
    );
    Serve { child, url }
}

/// QEMU processes whose command line names a sandbox directory of `data`,
/// with the sandbox id.
fn vmms(data: &Path) -> Vec<(u32, String)> {
    let prefix = format!("{}/sandboxes/", data.display());
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.contains("qemu") {
            continue;
        }
        if let Some(at) = cmd.find(&prefix) {
            let id: String = cmd[at + prefix.len()..].chars().take(15).collect();
            found.push((pid, id));
        }
    }
    found
}

fn dirs(data: &Path) -> BTreeSet<String> {
    std::fs::read_dir(data.join("sandboxes"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// TAP devices in this network namespace.
fn taps() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "type", "tun"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

struct Api {
    http: reqwest::Client,
    url: String,
    key: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        raw: Option<String>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .timeout(Duration::from_secs(120));
        if let Some(b) = body {
            r = r.json(&b);
        }
        if let Some(b) = raw {
            r = r.body(b);
        }
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn list(&self) -> Vec<Value> {
        let (s, v) = self
            .call(reqwest::Method::GET, "/sandboxes", None, None)
            .await
            .expect("list");
        assert_eq!(s, 200, "{v}");
        v.as_array().unwrap().clone()
    }
}

/// What the workload knows happened.
#[derive(Default, Debug)]
struct Model {
    /// Sandboxes whose create was acknowledged, with the files written to
    /// each that were acknowledged (path → content).
    created: BTreeMap<String, BTreeMap<String, String>>,
    /// Sandboxes a destroy was sent to (acknowledged or not).
    destroyed: BTreeSet<String>,
    /// Sandboxes a create was sent to whose answer was lost.
    maybe: BTreeSet<String>,
    next: u32,
    ops: BTreeMap<&'static str, (u32, u32)>,
}

impl Model {
    fn count(&mut self, op: &'static str, ok: bool) {
        let e = self.ops.entry(op).or_default();
        if ok {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
}

/// One step of the workload; errors (the daemon died under it) are normal.
async fn step(api: &Api, model: &mut Model, rng: &mut Rng) {
    use reqwest::Method as M;
    let names: Vec<String> = model.created.keys().cloned().collect();
    let pick = |rng: &mut Rng| names[rng.below(names.len() as u64) as usize].clone();
    let choice = if names.is_empty() { 0 } else { rng.below(8) };
    match choice {
        0 if names.len() < MAX_SANDBOXES => {
            let name = format!("c{}", model.next);
            model.next += 1;
            model.maybe.insert(name.clone());
            let r = api
                .call(
                    M::POST,
                    "/sandboxes",
                    Some(json!({"name": name, "memory_mb": 128})),
                    None,
                )
                .await;
            let ok = matches!(r, Ok((201, _)));
            if ok {
                model.maybe.remove(&name);
                model.created.insert(name, BTreeMap::new());
            }
            model.count("create", ok);
        }
        1 | 2 => {
            let n = pick(rng);
            let r = api
                .call(
                    M::POST,
                    &format!("/sandboxes/{n}/exec"),
                    Some(json!({"cmd": ["echo", "alive"]})),
                    None,
                )
                .await;
            let ok = matches!(&r, Ok((200, v)) if v["stdout"] == "alive\n");
            model.count("exec", ok);
        }
        3 | 4 => {
            let n = pick(rng);
            let path = format!("/workspace/f{}.txt", rng.below(1000));
            let content = format!("content {}", rng.next());
            let r = api
                .call(
                    M::PUT,
                    &format!("/sandboxes/{n}/files?path={path}"),
                    None,
                    Some(content.clone()),
                )
                .await;
            let ok = matches!(r, Ok((200, _)));
            if ok {
                model.created.get_mut(&n).unwrap().insert(path, content);
            }
            model.count("write", ok);
        }
        5 => {
            let n = pick(rng);
            let r = api
                .call(M::POST, &format!("/sandboxes/{n}/stop"), None, None)
                .await;
            model.count("stop", matches!(r, Ok((200, _))));
        }
        6 => {
            let n = pick(rng);
            let r = api
                .call(M::POST, &format!("/sandboxes/{n}/start"), None, None)
                .await;
            model.count("start", matches!(r, Ok((200, _))));
        }
        _ => {
            let n = pick(rng);
            model.created.remove(&n);
            model.destroyed.insert(n.clone());
            let r = api
                .call(M::DELETE, &format!("/sandboxes/{n}"), None, None)
                .await;
            model.count("destroy", matches!(r, Ok((204, _))));
        }
    }
}

/// Nothing runs or lies on disk that no listed sandbox owns.
fn assert_no_orphans(data: &Path, listed: &[Value], when: &str) {
    let ids: BTreeSet<String> = listed
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    for (pid, id) in vmms(data) {
        assert!(
            ids.contains(&id),
            "{when}: VMM {pid} of {id} has no row ({ids:?})"
        );
    }
    for dir in dirs(data) {
        assert!(
            ids.contains(&dir),
            "{when}: directory {dir} has no row ({ids:?})"
        );
    }
    let running = listed.iter().filter(|s| s["status"] == "running").count();
    let taps = taps();
    assert!(
        taps.len() <= running,
        "{when}: TAPs {taps:?} with {running} running sandboxes"
    );
}

#[test]
fn sigkill_at_random_moments_leaves_nothing_behind() {
    assert!(
        testkit::is_root(),
        "the chaos test needs root (namespaces, TAPs)"
    );
    let seed = std::env::var("BHATTI_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("chaos seed {seed} (BHATTI_CHAOS_SEED={seed} replays the schedule)");
    let mut rng = Rng(seed);
    let _ns = Netns::enter("chaos");
    let data_dir = testkit::data_dir_with_images(Tier::Tiny);
    let data: PathBuf = data_dir.path().to_path_buf();
    let config = data.join("bhatti.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nengine = \"qemu-tcg\"\n\
             [defaults]\nauto_templates = false\nimage = \"tiny\"\nmemory_mb = 128\n\
             [thermal]\nwarm_after_secs = 2\ncold_after_secs = 6\n\
             [limits]\ncreates_per_min = 10000\nexecs_per_min = 10000\nreads_per_min = 10000\n",
            data.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["user", "create", "--name", "t", "--quiet", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "user create: {out:?}");
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let http = reqwest::Client::new();
    let mut model = Model::default();
    for round in 0..KILLS {
        let mut serve = start_daemon(&data, &config, round);
        let api = Api {
            http: http.clone(),
            url: serve.url.clone(),
            key: key.clone(),
        };
        rt.block_on(async {
            // Recovery is done before the daemon serves.
            let listed = api.list().await;
            assert_no_orphans(&data, &listed, &format!("after restart {round}"));
            // Acknowledged sandboxes are all still there.
            let names: BTreeSet<&str> = listed.iter().filter_map(|s| s["name"].as_str()).collect();
            for n in model.created.keys() {
                assert!(names.contains(n.as_str()), "round {round}: {n} vanished");
            }
            // Lost creates that did happen count as created.
            for n in std::mem::take(&mut model.maybe) {
                if names.contains(n.as_str()) {
                    model.created.insert(n, BTreeMap::new());
                }
            }
            // A failed sandbox (a create or destroy cut short, or its disk
            // gone) must be destroyable; the workload then has room again.
            for sb in &listed {
                if sb["status"] == "failed" {
                    let name = sb["name"].as_str().unwrap().to_string();
                    let (s, v) = api
                        .call(
                            reqwest::Method::DELETE,
                            &format!("/sandboxes/{name}"),
                            None,
                            None,
                        )
                        .await
                        .expect("destroy a failed sandbox");
                    assert_eq!(s, 204, "round {round}: destroy failed {name}: {v}");
                    model.created.remove(&name);
                    model.destroyed.insert(name);
                    model.count("destroy failed", true);
                }
            }
            // Acknowledged files survived the kill (and the recovery).
            for sb in &listed {
                let name = sb["name"].as_str().unwrap();
                if sb["status"] != "running" {
                    continue;
                }
                let files = model.created.get(name).cloned().unwrap_or_default();
                for (path, content) in &files {
                    let (s, v) = api
                        .call(
                            reqwest::Method::POST,
                            &format!("/sandboxes/{name}/exec"),
                            Some(json!({"cmd": ["cat", path]})),
                            None,
                        )
                        .await
                        .expect("read an acknowledged file");
                    assert_eq!(
                        (s, v["stdout"].as_str()),
                        (200, Some(content.as_str())),
                        "round {round}: {name}:{path} was acknowledged: {v}"
                    );
                    model.count("file checked", true);
                }
            }
            let kill_after = Duration::from_millis(500 + rng.below(7500));
            let deadline = tokio::time::Instant::now() + kill_after;
            // The workload runs until the kill; the step in flight then
            // loses its daemon, as a client would.
            let mut step_rng = Rng(rng.next() | 1);
            let work = async {
                loop {
                    step(&api, &mut model, &mut step_rng).await;
                }
            };
            tokio::select! {
                _ = work => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        });
        serve.child.kill().expect("SIGKILL the daemon");
        serve.child.wait().unwrap();
        eprintln!(
            "kill {}: {} sandboxes acknowledged, ops {:?}",
            round + 1,
            model.created.len(),
            model.ops
        );
    }

    // The last start: everything listed works or is cleanly down.
    let serve = start_daemon(&data, &config, KILLS);
    let api = Api {
        http,
        url: serve.url.clone(),
        key,
    };
    let mut serve = serve;
    rt.block_on(async {
        use reqwest::Method as M;
        let listed = api.list().await;
        assert_no_orphans(&data, &listed, "at the end");
        let names: BTreeSet<&str> = listed.iter().filter_map(|s| s["name"].as_str()).collect();
        for n in model.created.keys() {
            assert!(
                names.contains(n.as_str()),
                "{n} was acknowledged and vanished"
            );
        }
        let mut working = 0;
        let statuses: Vec<_> = listed
            .iter()
            .map(|s| format!("{}={}/{}", s["name"], s["status"], s["thermal"]))
            .collect();
        eprintln!("at the end: {statuses:?}");
        for sb in &listed {
            let name = sb["name"].as_str().unwrap();
            assert!(
                model.created.contains_key(name)
                    || model.destroyed.contains(name)
                    || model.maybe.contains(name),
                "{name} was never created: {sb}"
            );
            match sb["status"].as_str().unwrap() {
                "running" => {
                    let (s, v) = api
                        .call(
                            M::POST,
                            &format!("/sandboxes/{name}/exec"),
                            Some(json!({"cmd": ["echo", "alive"]})),
                            None,
                        )
                        .await
                        .unwrap();
                    assert_eq!((s, &v["stdout"]), (200, &json!("alive\n")), "{name}: {v}");
                    for (path, content) in model.created.get(name).into_iter().flatten() {
                        let (s, v) = api
                            .call(
                                M::POST,
                                &format!("/sandboxes/{name}/exec"),
                                Some(json!({"cmd": ["cat", path]})),
                                None,
                            )
                            .await
                            .unwrap();
                        assert_eq!(
                            (s, v["stdout"].as_str()),
                            (200, Some(content.as_str())),
                            "{name}:{path} was acknowledged: {v}"
                        );
                    }
                    working += 1;
                }
                "stopped" | "failed" => {}
                other => panic!("{name} is {other}: {sb}"),
            }
        }
        eprintln!(
            "{} listed, {working} working, {} acknowledged files checked",
            listed.len(),
            model.created.values().map(|f| f.len()).sum::<usize>()
        );
        // Every one of them is destroyable, and then nothing is left.
        for sb in &listed {
            let id = sb["id"].as_str().unwrap();
            let (s, v) = api
                .call(M::DELETE, &format!("/sandboxes/{id}"), None, None)
                .await
                .unwrap();
            assert_eq!(s, 204, "destroy {id}: {v}");
        }
        assert!(api.list().await.is_empty());
    });
    wait_until("every VMM has exited", Duration::from_secs(30), || {
        vmms(&data).is_empty()
    });
    assert_eq!(dirs(&data), BTreeSet::new(), "directories left");
    assert_eq!(taps(), Vec::<String>::new(), "TAPs left");
    serve.child.kill().unwrap();
    serve.child.wait().unwrap();
}
