//! `bhatti bench thermal`: pause, resume, warm resume+exec, stop (to cold),
//! cold resume+exec, and — for comparison — cold boot+exec, through the
//! real orchestrator; then snapshot size and time against how much guest
//! memory was dirtied.
//!
//! Self-contained like `bench boot`: images from `--data-dir`, sandboxes in
//! a temp directory, a bridge, TAP prefix and subnet of its own in the
//! current network namespace, all removed at the end (also on failure).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bhatti_core::{SandboxId, SandboxManager, SandboxSpec};
use image::{ImageStore, Layout};
use proto::ExecRequest;
use vmm::EnginePreference;

use super::stats::Samples;

#[derive(Debug, clap::Args)]
pub struct ThermalBenchArgs {
    /// Where the images are (built by `bhatti image build`).
    #[arg(long, value_name = "DIR", default_value = image::layout::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Image to measure.
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "minimal"])]
    image: String,
    /// Pause/resume (and warm wake) iterations.
    #[arg(long, default_value_t = 30)]
    warm_iterations: usize,
    /// Stop/cold-wake iterations.
    #[arg(long, default_value_t = 10)]
    cold_iterations: usize,
    /// Fresh boots (create → first exec) for the comparison.
    #[arg(long, default_value_t = 5)]
    boot_iterations: usize,
    /// The bench's own subnet (its bridge holds .1).
    #[arg(long, default_value = "10.236.0.0/24")]
    subnet: String,
    /// Engine: auto, qemu-tcg, qemu-kvm, firecracker.
    #[arg(long, default_value = "auto")]
    engine: EnginePreference,
    /// Run the VMMs unconfined (to compare with the default, confined).
    #[arg(long)]
    no_confine: bool,
}

#[derive(Debug, Default)]
struct Results {
    pause: Samples,
    resume: Samples,
    warm_exec: Samples,
    stop: Samples,
    cold_exec: Samples,
    boot_exec: Samples,
    /// (MiB dirtied, state bytes, memory-file bytes on disk, stop time)
    dirtied: Vec<(u64, u64, u64, Duration)>,
    /// Guest RAM resident in QEMU (KiB of the memory file) before a stop and right
    /// after the cold wake + exec that follows it.
    resident: Vec<(u64, u64)>,
}

/// KiB of the guest's memory file resident in a process (`Rss` of its
/// mapping in `/proc/PID/smaps`).
fn resident_ram_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let mut in_ram = false;
    let mut kib = 0;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Rss:") {
            if in_ram {
                kib += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        } else if line.contains('-') && line.split_whitespace().count() >= 5 {
            // A mapping's header line: `start-end perms offset dev inode [path]`.
            in_ram = line.trim_end().ends_with(bhatti_core::MEMORY_FILE);
        }
    }
    kib
}

pub fn run(args: ThermalBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.warm_iterations > 0 && args.cold_iterations > 0 && args.boot_iterations > 0,
        "iterations must be at least 1"
    );
    ImageStore::new(Layout::new(&args.data_dir))
        .resolve(&args.image)
        .with_context(|| format!("image '{}' in {}", args.image, args.data_dir.display()))?;
    let (_scratch, mgr) = super::scratch_manager(
        "therm",
        'q',
        &args.data_dir,
        args.engine,
        &args.subnet,
        !args.no_confine,
    )?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let result = rt.block_on(measure(&mgr, &args));
    for e in rt.block_on(super::destroy_every_sandbox(&mgr)) {
        eprintln!("warning: {e:#}");
    }
    if let Err(e) = mgr.teardown_networks() {
        eprintln!("warning: removing the bench network: {e:#}");
    }
    let r = result?;
    report(&args.image, &r);
    let ratio = r.cold_exec.p50().as_secs_f64() / r.boot_exec.p50().as_secs_f64().max(1e-9);
    println!("cold_wake_vs_boot_ratio_p50={ratio:.3}");
    Ok(())
}

fn exec_true() -> ExecRequest {
    ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    }
}

async fn sh(mgr: &SandboxManager, id: &SandboxId, script: &str) -> anyhow::Result<()> {
    let o = mgr
        .exec(
            id,
            ExecRequest {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                timeout_ms: Some(120_000),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("exec {script}"))?;
    anyhow::ensure!(
        o.exit.code == 0,
        "{script}: exit {:?}: {}",
        o.exit,
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

async fn timed_exec(mgr: &SandboxManager, id: &SandboxId) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let o = mgr.exec(id, exec_true()).await.context("exec true")?;
    anyhow::ensure!(o.exit.code == 0, "`true` exited with {:?}", o.exit);
    Ok(t.elapsed())
}

/// Bytes of a file actually allocated on disk (a sparse memory file holds
/// only what the guest touched).
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

async fn measure(mgr: &SandboxManager, args: &ThermalBenchArgs) -> anyhow::Result<Results> {
    let mut r = Results::default();
    let mut spec = SandboxSpec::new("bench-thermal", &args.image);
    spec.memory_mb = 256;
    let rec = mgr.create(spec).await.context("creating the sandbox")?;
    let id = rec.id.clone();
    timed_exec(mgr, &id).await?;

    for _ in 0..args.warm_iterations {
        let t = Instant::now();
        mgr.pause(&id).await.context("pause")?;
        r.pause.push(t.elapsed());
        let t = Instant::now();
        mgr.start(&id, false).await.context("resume")?;
        r.resume.push(t.elapsed());
    }
    for _ in 0..args.warm_iterations {
        mgr.pause(&id).await.context("pause")?;
        r.warm_exec.push(timed_exec(mgr, &id).await?);
    }
    eprintln!("warm: done");
    for i in 0..args.cold_iterations {
        let before = resident_ram_kib(mgr.get(&id)?.vmm_pid);
        let t = Instant::now();
        mgr.stop(&id).await.context("stop")?;
        r.stop.push(t.elapsed());
        let woke = timed_exec(mgr, &id).await?;
        r.cold_exec.push(woke);
        r.resident
            .push((before, resident_ram_kib(mgr.get(&id)?.vmm_pid)));
        eprintln!("cold #{}: wake+exec {woke:?}", i + 1);
        eprintln!(
            "cold #{}: wake+exec {:?}",
            i + 1,
            r.cold_exec.percentile(100.0)
        );
    }

    let state = rec.dir.join(bhatti_core::SNAPSHOT_DIR).join("vmstate");
    let memory = rec.dir.join(bhatti_core::MEMORY_FILE);
    // /dev/shm is a tmpfs of half the guest's RAM.
    for mib in [0u64, 32, 96] {
        if mib > 0 {
            sh(
                mgr,
                &id,
                &format!("dd if=/dev/urandom of=/dev/shm/dirty bs=1M count={mib} 2>/dev/null"),
            )
            .await?;
        }
        let t = Instant::now();
        mgr.stop(&id).await.context("stop")?;
        let took = t.elapsed();
        let bytes = std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0);
        r.dirtied.push((mib, bytes, allocated(&memory), took));
        sh(mgr, &id, "rm -f /dev/shm/dirty").await?;
    }
    mgr.destroy(&id).await.context("destroy")?;

    for i in 0..args.boot_iterations {
        let mut spec = SandboxSpec::new(format!("bench-boot-{i}"), &args.image);
        spec.memory_mb = 256;
        let t = Instant::now();
        let rec = mgr.create(spec).await.context("create")?;
        let o = mgr.exec(&rec.id, exec_true()).await.context("first exec")?;
        anyhow::ensure!(o.exit.code == 0, "`true` exited with {:?}", o.exit);
        r.boot_exec.push(t.elapsed());
        mgr.destroy(&rec.id).await.context("destroy")?;
        eprintln!("boot #{}: {:?}", i + 1, t.elapsed());
    }
    Ok(r)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn report(image: &str, r: &Results) {
    println!("\n{image}, 256 MiB guest, RAM in a shared memory file");
    println!(
        "  {:<36} {:>10} {:>10} {:>10}",
        "operation", "p50 ms", "p95 ms", "p99 ms"
    );
    for (name, s) in [
        ("pause (hot → warm)", &r.pause),
        ("resume (warm → hot)", &r.resume),
        ("warm resume + exec `true`", &r.warm_exec),
        ("stop (sync, snapshot, verify, kill)", &r.stop),
        ("cold resume + exec `true`", &r.cold_exec),
        ("cold boot + exec `true` (create)", &r.boot_exec),
    ] {
        println!(
            "  {name:<36} {:>10} {:>10} {:>10}",
            ms(s.p50()),
            ms(s.percentile(95.0)),
            ms(s.percentile(99.0))
        );
    }
    if let Some((before, after)) = r.resident.last() {
        let mean_after =
            r.resident.iter().map(|(_, a)| a).sum::<u64>() / r.resident.len().max(1) as u64;
        println!(
            "\n  guest RAM mapped in QEMU (resident pages of the memory file): {} MiB before a stop; {} MiB right after the cold wake + exec (mean {} MiB); the file holds {} MiB: a restore maps pages as the guest touches them, nothing is read up front",
            before >> 10,
            after >> 10,
            mean_after >> 10,
            r.dirtied.first().map_or(0, |d| d.2 >> 20)
        );
    }
    println!("\n  snapshot vs guest memory dirtied (tmpfs writes before the stop)");
    println!(
        "  {:>12} {:>16} {:>22} {:>12}",
        "dirtied MiB", "state bytes", "memory file on disk", "stop ms"
    );
    for (mib, state, mem, took) in &r.dirtied {
        println!(
            "  {mib:>12} {state:>16} {:>19} MiB {:>12}",
            mem >> 20,
            ms(*took)
        );
    }
}
