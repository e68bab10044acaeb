//! `bhatti bench boot`: create → first exec (`true`) through the real
//! orchestrator, with where the time goes.
//!
//! Self-contained: images are read from the data directory, sandboxes go
//! to a temp directory, and the bench makes its own bridge and TAPs in the
//! network namespace it is started in (names and a subnet of its own) and
//! removes them at the end, also on failure.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bhatti_core::{SandboxManager, SandboxSpec};
use image::{ImageStore, Layout, Tier};
use proto::ExecRequest;
use vmm::EnginePreference;

use super::stats::Samples;

#[derive(Debug, clap::Args)]
pub struct BootBenchArgs {
    /// Where the images are (built by `bhatti image build`).
    #[arg(long, value_name = "DIR", default_value = image::layout::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Measure one image only (default: tiny, then minimal; the last line
    /// reports the last image measured).
    #[arg(long, value_parser = ["tiny", "minimal"])]
    image: Option<String>,
    /// Sandboxes created per image.
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// The bench's own subnet (its bridge holds .1).
    #[arg(long, default_value = "10.231.0.0/24")]
    subnet: String,
    /// Engine: auto, qemu-tcg, qemu-kvm, firecracker.
    #[arg(long, default_value = "auto")]
    engine: EnginePreference,
    /// Run the VMMs unconfined (to compare with the default, confined).
    #[arg(long)]
    no_confine: bool,
}

/// One create → first exec, split into phases.
#[derive(Debug, Default)]
struct Phases {
    total: Samples,
    prepare: Samples,
    vmm_start: Samples,
    agent_ready: Samples,
    first_exec: Samples,
    guest_kernel_to_init: Samples,
    guest_init: Samples,
    guest_kernel_to_agent: Samples,
    destroy: Samples,
}

pub fn run(args: BootBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.iterations > 0, "--iterations must be at least 1");
    let tiers: Vec<Tier> = match args.image.as_deref() {
        Some(name) => vec![Tier::from_name(name).context("unknown image")?],
        None => vec![Tier::Tiny, Tier::Minimal],
    };
    let store = ImageStore::new(Layout::new(&args.data_dir));
    for t in &tiers {
        store
            .resolve(t.name())
            .with_context(|| format!("image '{t}' in {}", args.data_dir.display()))?;
    }
    let (_scratch, mgr) = super::scratch_manager(
        "boot",
        'b',
        &args.data_dir,
        args.engine,
        &args.subnet,
        !args.no_confine,
    )?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let result = rt.block_on(measure(&mgr, &tiers, args.iterations));
    // Cleanup whatever happened above.
    for e in rt.block_on(super::destroy_every_sandbox(&mgr)) {
        eprintln!("warning: {e:#}");
    }
    if let Err(e) = mgr.teardown_networks() {
        eprintln!("warning: removing the bench network: {e:#}");
    }
    let results = result?;
    let mut last = None;
    for (tier, p) in &results {
        report(*tier, p);
        last = Some(p.total.p50());
    }
    for (tier, p) in &results {
        println!("boot_to_exec_ms_p50_{tier}={}", ms(p.total.p50()));
    }
    if let Some(p50) = last {
        println!("boot_to_exec_ms_p50={}", ms(p50));
    }
    Ok(())
}

async fn measure(
    mgr: &SandboxManager,
    tiers: &[Tier],
    iterations: usize,
) -> anyhow::Result<Vec<(Tier, Phases)>> {
    let mut out = Vec::new();
    for &tier in tiers {
        let mut p = Phases::default();
        for i in 0..iterations {
            let mut spec = SandboxSpec::new(format!("bench-{tier}-{i}"), tier.name());
            spec.memory_mb = 256;
            let started = Instant::now();
            let rec = mgr
                .create(spec)
                .await
                .with_context(|| format!("creating a {tier} sandbox"))?;
            let exec_started = Instant::now();
            let o = mgr
                .exec(
                    &rec.id,
                    ExecRequest {
                        argv: vec!["true".into()],
                        ..Default::default()
                    },
                )
                .await
                .context("first exec")?;
            let done = Instant::now();
            anyhow::ensure!(o.exit.code == 0, "`true` exited with {:?}", o.exit);
            let boot = rec.boot.context("no boot timings")?;
            p.total.push(done - started);
            p.prepare.push(boot.prepare);
            p.vmm_start.push(boot.vmm_start);
            p.agent_ready.push(boot.agent_ready);
            p.first_exec.push(done - exec_started);
            let serial = std::fs::read_to_string(rec.serial_log()).unwrap_or_default();
            if let Some((k, init)) = guest_boot(&serial) {
                p.guest_kernel_to_init.push(k);
                p.guest_init.push(init);
            }
            if let Some(a) = guest_agent_ready(&serial) {
                p.guest_kernel_to_agent.push(a);
            }
            let destroy_started = Instant::now();
            mgr.destroy(&rec.id).await.context("destroy")?;
            p.destroy.push(destroy_started.elapsed());
            eprintln!("{tier} #{}: {} ms to first exec", i + 1, ms(done - started));
        }
        out.push((tier, p));
    }
    Ok(out)
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn report(tier: Tier, p: &Phases) {
    let line = |name: &str, s: &Samples| {
        if s.p50() > Duration::ZERO {
            println!(
                "  {name:<44} p50 {:>6} ms   p95 {:>6} ms",
                ms(s.p50()),
                ms(s.percentile(95.0))
            );
        }
    };
    println!("\n{tier}: create → first exec (`true`)");
    line("total", &p.total);
    line("prepare (dir, sparse disk, config drive, TAP)", &p.prepare);
    line("VMM spawn until vCPUs run", &p.vmm_start);
    line("vCPUs run until the agent authenticates", &p.agent_ready);
    line(
        "  guest: kernel start → lohar (PID 1)",
        &p.guest_kernel_to_init,
    );
    line("  guest: lohar init (modules, root, net)", &p.guest_init);
    line(
        "  guest: kernel start → agent listening",
        &p.guest_kernel_to_agent,
    );
    line("first exec `true` (pooled, authenticated)", &p.first_exec);
    line("destroy (not in total)", &p.destroy);
    let parts = [
        ("prepare", p.prepare.p50()),
        ("VMM spawn", p.vmm_start.p50()),
        ("kernel → agent ready", p.agent_ready.p50()),
        ("first exec", p.first_exec.p50()),
    ];
    if let Some((name, d)) = parts.iter().max_by_key(|(_, d)| *d) {
        let share = d.as_secs_f64() / p.total.p50().as_secs_f64().max(1e-9) * 100.0;
        println!("  dominated by: {name} ({share:.0}% of the p50 total)");
    }
}

/// `lohar: booted: init started K ms after the kernel, took I ms`.
fn guest_boot(serial: &str) -> Option<(Duration, Duration)> {
    let line = serial
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("lohar: booted: init started "))?;
    let (k, rest) = line.split_once(" ms after the kernel, took ")?;
    let i = rest.strip_suffix(" ms")?;
    Some((
        Duration::from_millis(k.trim().parse().ok()?),
        Duration::from_millis(i.trim().parse().ok()?),
    ))
}

/// `lohar: agent ready on ADDR, A ms after the kernel started`.
fn guest_agent_ready(serial: &str) -> Option<Duration> {
    let line = serial
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("lohar: agent ready on "))?;
    let (_, rest) = line.split_once(", ")?;
    let a = rest.strip_suffix(" ms after the kernel started")?;
    Some(Duration::from_millis(a.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_guest_boot_lines() {
        let serial = "[    0.1] something\r\nlohar: booted: init started 812 ms after the kernel, took 143 ms\r\nlohar: agent ready on 0.0.0.0:1024, 990 ms after the kernel started\n";
        assert_eq!(
            guest_boot(serial),
            Some((Duration::from_millis(812), Duration::from_millis(143)))
        );
        assert_eq!(guest_agent_ready(serial), Some(Duration::from_millis(990)));
        assert_eq!(guest_boot("lohar: booted: init started x ms"), None);
        assert_eq!(guest_agent_ready(""), None);
    }
}
