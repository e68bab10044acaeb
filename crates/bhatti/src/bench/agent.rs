//! `bhatti bench agent`: lohar in test mode on a Unix socket, against the
//! same work done directly by this process.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_client::{AgentClient, Endpoint, ExecEvent, WriteOptions};
use anyhow::{bail, Context};
use proto::{ExecRequest, FileRead};

use super::stats::{header, row, Samples};

#[derive(Debug, clap::Args)]
pub struct AgentBenchArgs {
    /// Samples per measured operation.
    #[arg(long, default_value_t = 300)]
    iterations: usize,
    /// The lohar binary (default: $BHATTI_LOHAR, else next to this binary).
    #[arg(long)]
    lohar: Option<PathBuf>,
    /// Bytes streamed through stdout for the throughput figure.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    stream_bytes: u64,
}

/// Finds the lohar binary: explicit flag, `$BHATTI_LOHAR`, or beside `bhatti`.
pub fn find_lohar(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit.or_else(|| std::env::var_os("BHATTI_LOHAR").map(PathBuf::from)) {
        if p.is_file() {
            return Ok(p);
        }
        bail!("lohar binary {} does not exist", p.display());
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let beside = exe.with_file_name("lohar");
    if beside.is_file() {
        return Ok(beside);
    }
    bail!(
        "no lohar binary beside {}; build it (cargo build --release -p lohar) or pass --lohar PATH",
        exe.display()
    )
}

/// A lohar process serving on a Unix socket in a temp dir; killed on drop.
struct LocalAgent {
    child: Child,
    client: AgentClient,
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("warning: cannot stop lohar: {e}");
        }
        let _ = self.child.wait();
    }
}

fn start_agent(lohar: &Path, dir: &Path, run_as: &str) -> anyhow::Result<LocalAgent> {
    std::fs::create_dir_all(dir)?;
    let token = format!(
        "bench-{:032x}",
        std::process::id() as u128 * 0x9e37_79b9_7f4a_7c15
    );
    std::fs::write(dir.join("token"), &token)?;
    let config = serde_config(dir, run_as);
    std::fs::write(dir.join("config.json"), config)?;
    let sock = dir.join("agent.sock");
    let mut child = Command::new(lohar)
        .arg("serve")
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--token-file")
        .arg(dir.join("token"))
        .arg("--config")
        .arg(dir.join("config.json"))
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", lohar.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("lohar stdout")?).read_line(&mut line)?;
    if !line.starts_with("LISTENING") {
        bail!("lohar did not start: {line:?}");
    }
    Ok(LocalAgent {
        child,
        client: AgentClient::new(Endpoint::Unix(sock), token),
    })
}

/// The agent's defaults, except: commands run as the bench's own user (the
/// raw baseline does not switch users either; the cost of switching is
/// measured on its own row by a second agent), and detached logs stay in
/// the temp dir.
fn serde_config(dir: &Path, run_as: &str) -> String {
    let dir = dir
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    format!("{{\"detach_log_dir\": \"{dir}\", \"run_as\": {run_as}}}")
}

fn argv(args: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// What the agent does for a write, done here: temp file, fsync, rename, fsync dir.
fn atomic_write_local(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
}

fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let v = f();
    (t.elapsed(), v)
}

pub fn run(args: AgentBenchArgs) -> anyhow::Result<()> {
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let lohar = find_lohar(args.lohar)?;
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let agent = start_agent(&lohar, &dir.path().join("same-user"), "\"agent\"")?;
    // The production setting: a root agent runs commands as uid 1000.
    let switching = if nix_is_root() && uid_1000_exists() {
        Some(start_agent(
            &lohar,
            &dir.path().join("uid-1000"),
            "\"auto\"",
        )?)
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = agent.client.clone();
    let n = args.iterations;
    println!(
        "bhatti bench agent: lohar {} on a Unix socket, {n} samples per operation",
        lohar.display()
    );

    // Warm up the pool, the page cache and the binaries.
    rt.block_on(async {
        for _ in 0..20 {
            client.exec(argv(&["true"])).await?;
        }
        anyhow::Ok(())
    })?;

    let (mut exec_agent, mut exec_raw, mut sync_cost, mut exec_switch) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    for _ in 0..n {
        if let Some(sw) = &switching {
            let (d, out) = time(|| rt.block_on(sw.client.exec(argv(&["true"]))));
            if out?.exit.code != 0 {
                bail!("`true` failed through the uid-1000 agent");
            }
            exec_switch.push(d);
        }
        // Interleaved, so drift in the machine hits both sides alike.
        let (d, out) = time(|| rt.block_on(client.exec(argv(&["true"]))));
        if out?.exit.code != 0 {
            bail!("`true` failed through the agent");
        }
        exec_agent.push(d);
        let (d, st) = time(|| Command::new("true").status());
        if !st?.success() {
            bail!("`true` failed locally");
        }
        exec_raw.push(d);
        let (d, ()) = time(nix_sync);
        sync_cost.push(d);
    }

    let mut rows = vec![row("exec true", &exec_agent, &exec_raw)];
    if switching.is_some() {
        rows.push(row("exec true as uid 1000", &exec_switch, &exec_raw));
    }
    for (label, size) in [("1 KiB", 1024usize), ("1 MiB", 1024 * 1024)] {
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let via_agent = dir.path().join(format!("agent-{size}"));
        let local = dir.path().join(format!("local-{size}"));
        let agent_path = via_agent.display().to_string();
        let (mut wa, mut wr, mut ra, mut rr) = (
            Samples::default(),
            Samples::default(),
            Samples::default(),
            Samples::default(),
        );
        for _ in 0..n {
            let (d, r) = time(|| {
                rt.block_on(client.write_file(&agent_path, &data, WriteOptions::default()))
            });
            r?;
            wa.push(d);
            let (d, r) = time(|| atomic_write_local(&local, &data));
            r?;
            wr.push(d);
            let req = FileRead {
                path: agent_path.clone(),
                ..Default::default()
            };
            let (d, r) = time(|| rt.block_on(client.read_file(req)));
            if r?.data.len() != size {
                bail!("short read through the agent");
            }
            ra.push(d);
            let (d, r) = time(|| std::fs::read(&local));
            if r?.len() != size {
                bail!("short local read");
            }
            rr.push(d);
        }
        rows.push(row(&format!("file write {label} (atomic)"), &wa, &wr));
        rows.push(row(&format!("file read {label}"), &ra, &rr));
    }

    let (agent_mbps, raw_mbps) = rt.block_on(stream_throughput(&client, args.stream_bytes))?;

    println!("{}", header());
    for r in rows {
        println!("{r}");
    }
    println!(
        "{:<28} {:>9} {:>9} {:>9} |",
        "sync() alone (in exec)",
        format!("{:.3}", sync_cost.p50().as_secs_f64() * 1000.0),
        format!("{:.3}", sync_cost.percentile(95.0).as_secs_f64() * 1000.0),
        format!("{:.3}", sync_cost.percentile(99.0).as_secs_f64() * 1000.0),
    );
    println!(
        "stdout streaming: agent {agent_mbps:.0} MB/s, raw pipe {raw_mbps:.0} MB/s, ratio {:.2}",
        raw_mbps / agent_mbps.max(1e-9)
    );
    println!(
        "exec_overhead_ratio_p50={:.3}",
        exec_agent.p50().as_secs_f64() / exec_raw.p50().as_secs_f64().max(1e-9)
    );
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn uid_1000_exists() -> bool {
    std::fs::read_to_string("/etc/passwd")
        .is_ok_and(|p| p.lines().any(|l| l.split(':').nth(2) == Some("1000")))
}

fn nix_sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// MB/s of `head -c N /dev/zero` through the agent, and through a local pipe.
async fn stream_throughput(client: &AgentClient, bytes: u64) -> anyhow::Result<(f64, f64)> {
    let count = bytes.to_string();
    let cmd = ["head", "-c", count.as_str(), "/dev/zero"];
    let t = Instant::now();
    let mut s = client.exec_stream(argv(&cmd)).await?;
    let mut got = 0u64;
    loop {
        match s.next().await? {
            ExecEvent::Stdout(d) => got += d.len() as u64,
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(_) => break,
        }
    }
    let agent_secs = t.elapsed().as_secs_f64();
    if got != bytes {
        bail!("streamed {got} of {bytes} bytes through the agent");
    }
    let t = Instant::now();
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    // The same pipe size the agent uses for command output.
    {
        use std::os::fd::AsRawFd;
        // SAFETY: F_SETPIPE_SZ on a pipe we own; no memory is passed.
        unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 256 * 1024) };
    }
    // The same read size the agent uses for command output.
    let mut buf = vec![0u8; 256 * 1024];
    let mut raw = 0u64;
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw += n as u64;
    }
    child.wait()?;
    let raw_secs = t.elapsed().as_secs_f64();
    if raw != bytes {
        bail!("streamed {raw} of {bytes} bytes locally");
    }
    let mb = bytes as f64 / 1e6;
    Ok((mb / agent_secs, mb / raw_secs))
}
