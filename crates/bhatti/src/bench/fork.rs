//! `bhatti bench fork`: fork → first exec in the child, create from a
//! template → first exec, and — the baseline, in the same run — a fresh
//! boot → first exec, through the real orchestrator; plus how long the
//! parent is paused for each fork's capture.
//!
//! Self-contained like `bench thermal`: images from `--data-dir`, sandboxes
//! in a temp directory, a bridge, TAP prefix and subnet of its own in the
//! current network namespace, all removed at the end (also on failure).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use bhatti_core::{SandboxId, SandboxManager, SandboxSpec};
use image::{ImageStore, Layout};
use proto::ExecRequest;
use vmm::EnginePreference;

use super::stats::{header, row, Samples};

#[derive(Debug, clap::Args)]
pub struct ForkBenchArgs {
    /// Where the images are (built by `bhatti image build`).
    #[arg(long, value_name = "DIR", default_value = image::layout::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Image to measure.
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "minimal"])]
    image: String,
    /// Iterations of each measurement.
    #[arg(long, default_value_t = 8)]
    iterations: usize,
    /// The bench's own subnet (its bridge holds .1).
    #[arg(long, default_value = "10.237.0.0/24")]
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
    fork_exec: Samples,
    paused: Samples,
    template_exec: Samples,
    boot_exec: Samples,
}

pub fn run(args: ForkBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.iterations > 0, "iterations must be at least 1");
    ImageStore::new(Layout::new(&args.data_dir))
        .resolve(&args.image)
        .with_context(|| format!("image '{}' in {}", args.image, args.data_dir.display()))?;
    let (scratch, mgr) = super::scratch_manager(
        "fork",
        'k',
        &args.data_dir,
        args.engine,
        &args.subnet,
        !args.no_confine,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let result = rt.block_on(measure(&mgr, &args, scratch.path()));
    for e in rt.block_on(super::destroy_every_sandbox(&mgr)) {
        eprintln!("warning: {e:#}");
    }
    if let Err(e) = mgr.teardown_networks() {
        eprintln!("warning: removing the bench network: {e:#}");
    }
    let r = result?;
    println!(
        "\n{}, 256 MiB guest; the baseline of each row is a fresh boot → first exec",
        args.image
    );
    println!("{}", header());
    println!("{}", row("fork → first exec", &r.fork_exec, &r.boot_exec));
    println!(
        "{}",
        row(
            "template create → first exec",
            &r.template_exec,
            &r.boot_exec
        )
    );
    println!("{}", row("parent paused per fork", &r.paused, &r.boot_exec));
    let ratio = |s: &Samples| s.p50().as_secs_f64() / r.boot_exec.p50().as_secs_f64().max(1e-9);
    println!(
        "template_create_vs_boot_ratio_p50={:.3}",
        ratio(&r.template_exec)
    );
    println!("fork_vs_boot_ratio_p50={:.3}", ratio(&r.fork_exec));
    Ok(())
}

fn spec(name: &str, image: &str) -> SandboxSpec {
    let mut s = SandboxSpec::new(name, image);
    s.memory_mb = 256;
    s
}

async fn exec_true(mgr: &SandboxManager, id: &SandboxId) -> anyhow::Result<()> {
    let o = mgr
        .exec(
            id,
            ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            },
        )
        .await
        .context("exec true")?;
    anyhow::ensure!(o.exit.code == 0, "`true` exited with {:?}", o.exit);
    Ok(())
}

async fn measure(
    mgr: &SandboxManager,
    args: &ForkBenchArgs,
    scratch: &std::path::Path,
) -> anyhow::Result<Results> {
    let mut r = Results::default();
    let parent = mgr
        .create(spec("bench-parent", &args.image))
        .await
        .context("creating the parent")?;
    exec_true(mgr, &parent.id).await?;

    for i in 0..args.iterations {
        let child = (
            SandboxId::generate()?,
            spec(&format!("bench-child-{i}"), &args.image),
        );
        let child_id = child.0.clone();
        let t = Instant::now();
        let (capture, made) = mgr
            .fork(&parent.id, vec![child], &scratch.join(format!("fork-{i}")))
            .await
            .context("fork")?;
        for m in made {
            m.context("fork child")?;
        }
        exec_true(mgr, &child_id).await?;
        r.fork_exec.push(t.elapsed());
        r.paused.push(capture.paused);
        eprintln!(
            "fork #{}: {:?} (parent paused {:?})",
            i + 1,
            t.elapsed(),
            capture.paused
        );
        mgr.destroy(&child_id).await.context("destroy a child")?;
    }
    mgr.destroy(&parent.id)
        .await
        .context("destroy the parent")?;

    let template = mgr
        .capture_fresh(
            SandboxId::generate()?,
            spec("bench-template", &args.image),
            &scratch.join("template"),
        )
        .await
        .context("making the template")?;
    for i in 0..args.iterations {
        let id = SandboxId::generate()?;
        let t = Instant::now();
        mgr.create_from_capture(
            id.clone(),
            spec(&format!("bench-tmpl-{i}"), &args.image),
            template.clone(),
        )
        .await
        .context("create from the template")?;
        exec_true(mgr, &id).await?;
        r.template_exec.push(t.elapsed());
        eprintln!("template #{}: {:?}", i + 1, t.elapsed());
        mgr.destroy(&id).await.context("destroy")?;
    }

    for i in 0..args.iterations {
        let t = Instant::now();
        let rec = mgr
            .create(spec(&format!("bench-boot-{i}"), &args.image))
            .await
            .context("create")?;
        exec_true(mgr, &rec.id).await?;
        r.boot_exec.push(t.elapsed());
        eprintln!("boot #{}: {:?}", i + 1, t.elapsed());
        mgr.destroy(&rec.id).await.context("destroy")?;
    }
    Ok(r)
}
