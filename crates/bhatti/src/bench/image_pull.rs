//! `bhatti bench image`: pull → bootable root filesystem of a ≥ 200 MB
//! image served by a local registry, against the same work done in the
//! same run by the standard tools: `skopeo copy docker://… oci:…` +
//! `umoci unpack` + `mkfs.ext4 -d` (with the options bhatti uses).
//!
//! The image is made here, not downloaded: the `minimal` tier's tree (read
//! out of its ext4 with `debugfs rdump`, nothing mounted) or generated
//! files of a rootfs-like size and compressibility mix, split into a few
//! gzip layers by `umoci`. Debian's `docker-registry` serves it on
//! 127.0.0.1 inside a network namespace the bench creates; both sides pull
//! from inside it (bhatti from a thread that entered it, skopeo through
//! `nsenter --net`), so no traffic leaves that namespace. Every bhatti
//! pull is cold (a new data directory: an empty blob cache) and goes
//! through `image::oci::Puller` as `bhatti image pull` does; warm pulls
//! (every blob cached: only the build) are reported beside them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use image::oci::registry::PullEvent;
use image::oci::{OciImages, PullOptions, Puller, Reference};
use image::{Layout, Tier};

use super::stats::{header, row, Samples};

const TOOLS: &[&str] = &[
    "ip",
    "nsenter",
    "docker-registry",
    "skopeo",
    "umoci",
    "tar",
    "curl",
    "mkfs.ext4",
    "e2fsck",
    "dumpe2fs",
    "debugfs",
];

const REGISTRY: &str = "127.0.0.1:5000";
const REPO: &str = "bench/img";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The `minimal` tier's tree if `--data-dir` has it, else generated.
    Auto,
    /// The `minimal` tier's tree (from `--data-dir`).
    Minimal,
    /// Generated files (`--size-mb`).
    Generated,
}

#[derive(Debug, clap::Args)]
pub struct ImageBenchArgs {
    /// Where the tier images are (the `minimal` tier is the test image's
    /// content when present).
    #[arg(long, value_name = "DIR", default_value = image::layout::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Iterations of each measurement.
    #[arg(long, default_value_t = 3)]
    iterations: usize,
    /// What the test image holds.
    #[arg(long, value_enum, default_value = "auto")]
    source: Source,
    /// Size of the generated content (MiB, uncompressed).
    #[arg(long, default_value_t = 256)]
    size_mb: u64,
    /// Number of layers the image is split into.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Seconds to wait before each timed pull, after the last one's files
    /// were removed: ext4 without a journal skips inodes freed in the last
    /// ~30 s when it allocates, so a tree made right after another was
    /// deleted costs several times more (0: no wait).
    #[arg(long, default_value_t = 35)]
    settle_secs: u64,
}

/// A network namespace with only loopback up, removed on drop.
struct Netns(String);

impl Netns {
    fn new() -> anyhow::Result<Self> {
        let name = format!("bhbench-img-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self(name);
        run(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }

    /// `nsenter --net=… <program>`.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).arg(program);
        c
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let file = std::fs::File::open(self.path()).context("opening the namespace")?;
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsRawFd;
                // SAFETY: a valid namespace fd; affects only this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .context("entering the bench's network namespace");
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the pull thread panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process killed on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Writes dirty pages out and lets the inodes the last measurement freed
/// age, so one measurement does not pay for the last.
fn settle(secs: u64) {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_secs(secs));
}

#[derive(Debug, Default)]
struct Results {
    cold: Samples,
    cold_download: Samples,
    cold_build: Samples,
    warm: Samples,
    tools: Samples,
    skopeo: Samples,
    umoci: Samples,
    mkfs: Samples,
}

pub fn run_bench(args: ImageBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.iterations > 0, "iterations must be at least 1");
    anyhow::ensure!((1..=32).contains(&args.layers), "--layers must be 1 to 32");
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "bench image needs root (layer ownership, a network namespace)"
    );
    for t in TOOLS {
        anyhow::ensure!(on_path(t), "bench image needs `{t}` on PATH");
    }
    let minimal = Layout::new(&args.data_dir).rootfs(Tier::Minimal);
    let source = match args.source {
        Source::Auto if minimal.is_file() => Source::Minimal,
        Source::Auto => Source::Generated,
        s => s,
    };
    if source == Source::Minimal && !minimal.is_file() {
        bail!(
            "no minimal tier at {} (build it, or use --source generated)",
            minimal.display()
        );
    }
    let scratch = tempfile::Builder::new()
        .prefix("bhatti-bench-image-")
        .tempdir_in("/var/tmp")
        .context("temp dir")?;
    let dir = scratch.path();

    // The test image's tree.
    let tree = dir.join("tree");
    std::fs::create_dir(&tree)?;
    let t = Instant::now();
    let what = match source {
        Source::Minimal => {
            run(Command::new("debugfs")
                .arg("-R")
                .arg(format!("rdump / {}", tree.display()))
                .arg(&minimal))?;
            // mkfs.ext4 -d makes its own.
            let _ = std::fs::remove_dir(tree.join("lost+found"));
            format!("the minimal tier's tree ({})", minimal.display())
        }
        _ => {
            generate_tree(&tree, args.size_mb << 20)?;
            format!("generated files ({} MiB asked)", args.size_mb)
        }
    };
    let usage = image::tree_usage(&tree)?;
    println!(
        "test image: {what}: {:.1} MiB in {} inodes (made in {:.1}s)",
        usage.block_bytes as f64 / (1 << 20) as f64,
        usage.inodes,
        t.elapsed().as_secs_f64()
    );

    // Layers, an OCI layout, the registry, the push.
    let t = Instant::now();
    let lay = make_layout(dir, &tree, args.layers)?;
    std::fs::remove_dir_all(&tree).context("removing the source tree")?;
    let ns = Netns::new()?;
    let _registry = start_registry(&ns, dir)?;
    run(ns
        .cmd("skopeo")
        .args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", lay.display()))
        .arg(format!("docker://{REGISTRY}/{REPO}:v1")))?;
    let blobs = dir.join("registry/docker/registry/v2/blobs");
    let stored = image::tree_usage(&blobs)?.block_bytes;
    println!(
        "registry: docker-registry on {REGISTRY} in network namespace {}: {} gzip layers, {:.1} MiB stored (ready in {:.1}s)",
        ns.0,
        args.layers,
        stored as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&lay).context("removing the layout")?;

    let mut r = Results::default();
    let reference = Reference::parse(&format!("{REGISTRY}/{REPO}:v1"))?;
    let warm_data = dir.join("warm");
    for i in 0..args.iterations {
        // bhatti, cold: a data directory of its own, an empty blob cache.
        let data = dir.join(format!("bhatti-{i}"));
        settle(args.settle_secs);
        let (total, download) = ns.run(|| pull(&data, &reference))??;
        r.cold.push(total);
        r.cold_download.push(download);
        r.cold_build.push(total.saturating_sub(download));
        let images = OciImages::new(Layout::new(&data));
        let rootfs = images.rootfs("bench");
        if i == 0 {
            check_ext4(&rootfs, "bhatti's")?;
        }
        let bhatti_inodes = used_inodes(&rootfs)?;
        if i + 1 == args.iterations {
            std::fs::rename(&data, &warm_data)?;
        } else {
            std::fs::remove_dir_all(&data)?;
        }

        // The tools.
        let out = dir.join(format!("tools-{i}"));
        std::fs::create_dir(&out)?;
        settle(args.settle_secs);
        let (t_skopeo, t_umoci, t_mkfs, ext4) = tools(&ns, &out)?;
        r.skopeo.push(t_skopeo);
        r.umoci.push(t_umoci);
        r.mkfs.push(t_mkfs);
        r.tools.push(t_skopeo + t_umoci + t_mkfs);
        if i == 0 {
            check_ext4(&ext4, "the tools'")?;
            let tools_inodes = used_inodes(&ext4)?;
            println!("inodes used: bhatti {bhatti_inodes}, tools {tools_inodes}");
        }
        std::fs::remove_dir_all(&out)?;
        eprintln!(
            "#{}: bhatti {:.2}s (download {:.2}s), tools {:.2}s (skopeo {:.2}s, umoci {:.2}s, mkfs {:.2}s)",
            i + 1,
            total.as_secs_f64(),
            download.as_secs_f64(),
            (t_skopeo + t_umoci + t_mkfs).as_secs_f64(),
            t_skopeo.as_secs_f64(),
            t_umoci.as_secs_f64(),
            t_mkfs.as_secs_f64()
        );
    }
    // bhatti, warm: every blob cached, only the build.
    for i in 0..args.iterations {
        settle(args.settle_secs);
        let (total, _) = ns.run(|| pull(&warm_data, &reference))??;
        r.warm.push(total);
        eprintln!("warm #{}: {:.2}s", i + 1, total.as_secs_f64());
    }
    drop(_registry);
    drop(ns);

    println!(
        "\npull → rootfs.ext4, {} MiB of content in {} inodes, {} iterations ({} s settle before each); the baseline is skopeo copy + umoci unpack + mkfs.ext4 -d",
        usage.block_bytes >> 20,
        usage.inodes,
        args.iterations,
        args.settle_secs
    );
    println!("{}", header());
    println!("{}", row("pull, cold (empty cache)", &r.cold, &r.tools));
    println!(
        "{}",
        row("  download + verify", &r.cold_download, &r.skopeo)
    );
    println!(
        "{}",
        row("  unpack + mkfs", &r.cold_build, &{
            let mut s = Samples::default();
            for (u, m) in r.umoci.iter().zip(r.mkfs.iter()) {
                s.push(*u + *m);
            }
            s
        })
    );
    println!("{}", row("pull, warm (blobs cached)", &r.warm, &r.tools));
    println!("{}", row("  tools: mkfs.ext4 -d alone", &r.mkfs, &r.tools));
    let ratio = r.cold.p50().as_secs_f64() / r.tools.p50().as_secs_f64().max(1e-9);
    println!("image_pull_vs_tools_ratio={ratio:.3}");
    Ok(())
}

/// One pull of the bench image into data directory `data`: its total time
/// and the part until the blobs were all there.
fn pull(data: &Path, reference: &Reference) -> anyhow::Result<(Duration, Duration)> {
    let images = OciImages::new(Layout::new(data));
    let opts = PullOptions {
        insecure: true,
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime")?;
    let start = Instant::now();
    let mut download = None;
    let mut puller = Puller::new(images, opts)?;
    rt.block_on(puller.pull(reference, "bench", &mut |e| {
        if e == PullEvent::Building {
            download = Some(start.elapsed());
        }
    }))
    .context("pull")?;
    let total = start.elapsed();
    Ok((total, download.unwrap_or(total)))
}

/// The standard tools doing the same: skopeo copies the image out of the
/// registry into an OCI layout, umoci unpacks it, mkfs.ext4 packs the tree
/// with bhatti's options (size and inode count from the same rule).
fn tools(ns: &Netns, out: &Path) -> anyhow::Result<(Duration, Duration, Duration, PathBuf)> {
    let lay = out.join("lay");
    let t = Instant::now();
    run(ns
        .cmd("skopeo")
        .args(["--insecure-policy", "copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{REGISTRY}/{REPO}:v1"))
        .arg(format!("oci:{}:v1", lay.display())))?;
    let t_skopeo = t.elapsed();
    let bundle = out.join("bundle");
    let t = Instant::now();
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", lay.display()))
        .arg(&bundle))?;
    let t_umoci = t.elapsed();
    let t = Instant::now();
    let rootfs = bundle.join("rootfs");
    let usage = image::tree_usage(&rootfs)?;
    let ext4 = out.join("rootfs.ext4");
    std::fs::File::create(&ext4)?.set_len(image::mkfs::image_size_for(usage))?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-b", "4096", "-L", "bhatti-oci"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .args(["-O", "^has_journal"])
        .args(["-N", &image::mkfs::inodes_for(usage).to_string()])
        .arg("-d")
        .arg(&rootfs)
        .arg(&ext4))?;
    let t_mkfs = t.elapsed();
    Ok((t_skopeo, t_umoci, t_mkfs, ext4))
}

/// `e2fsck -fn`: the image is a clean ext4.
fn check_ext4(path: &Path, whose: &str) -> anyhow::Result<()> {
    run(Command::new("e2fsck").arg("-fn").arg(path))
        .with_context(|| format!("{whose} rootfs.ext4 does not pass e2fsck -fn"))?;
    println!("e2fsck -fn: {whose} rootfs.ext4 is clean");
    Ok(())
}

fn used_inodes(path: &Path) -> anyhow::Result<u64> {
    let out = run(Command::new("dumpe2fs")
        .arg("-h")
        .arg(path)
        .stderr(Stdio::null()))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("dumpe2fs: no '{name}'"))
    };
    Ok(field("Inode count:")? - field("Free inodes:")?)
}

/// Starts docker-registry on 127.0.0.1:5000 inside `ns`, storing under
/// `dir/registry`; returns once it answers.
fn start_registry(ns: &Netns, dir: &Path) -> anyhow::Result<Killed> {
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {REGISTRY}\n",
            dir.join("registry").display()
        ),
    )?;
    let registry = Killed(
        ns.cmd("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry")?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ns
            .cmd("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{REGISTRY}/v2/"))
            .output()
            .context("curl")?;
        if out.stdout == b"200" {
            return Ok(registry);
        }
        if Instant::now() > deadline {
            bail!("docker-registry did not answer within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The tree's entries one below the top (and top-level files), with their
/// sizes: the units the layers are made of.
/// Top-level directories, and the units with their sizes.
type Units = (Vec<String>, Vec<(String, u64)>);

fn split_units(tree: &Path) -> anyhow::Result<Units> {
    let mut tops = Vec::new();
    let mut units = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(tree)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for top in names {
        let p = tree.join(&top);
        let m = p.symlink_metadata()?;
        if m.is_dir() {
            tops.push(top.clone());
            let mut kids: Vec<_> = std::fs::read_dir(&p)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()?;
            kids.sort();
            for k in kids {
                let rel = format!("{top}/{k}");
                let q = tree.join(&rel);
                let size = if q.symlink_metadata()?.is_dir() {
                    image::tree_usage(&q)?.block_bytes
                } else {
                    q.symlink_metadata()?.len()
                };
                units.push((rel, size));
            }
        } else {
            units.push((top, m.len()));
        }
    }
    Ok((tops, units))
}

/// An OCI layout `dir/lay` holding `:v1`: the tree in `layers` gzip
/// layers of about equal size (whole second-level entries each).
fn make_layout(dir: &Path, tree: &Path, layers: usize) -> anyhow::Result<PathBuf> {
    let (tops, mut units) = split_units(tree)?;
    units.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut bins: Vec<(u64, Vec<String>)> = vec![(0, vec![]); layers];
    for (rel, size) in units {
        let bin = bins.iter_mut().min_by_key(|b| b.0).expect("layers ≥ 1");
        bin.0 += size;
        bin.1.push(rel);
    }
    let lay = dir.join("lay");
    run(Command::new("umoci").args(["init", "--layout"]).arg(&lay))?;
    let img = format!("{}:v1", lay.display());
    run(Command::new("umoci").args(["new", "--image", &img]))?;
    for (i, (_, members)) in bins.iter().enumerate() {
        let tar = dir.join(format!("layer-{i}.tar"));
        let mut cmd = Command::new("tar");
        cmd.arg("-C")
            .arg(tree)
            .args(["--numeric-owner", "-cf"])
            .arg(&tar);
        if i == 0 {
            // The top-level directories themselves (modes, owners).
            cmd.arg("--no-recursion").args(&tops).arg("--recursion");
        }
        cmd.arg("--").args(members);
        if members.is_empty() && (i > 0 || tops.is_empty()) {
            continue;
        }
        run(&mut cmd)?;
        run(Command::new("umoci")
            .args(["raw", "add-layer", "--image", &img])
            .arg(&tar))?;
        std::fs::remove_file(&tar)?;
    }
    run(Command::new("umoci").args([
        "config",
        "--image",
        &img,
        "--config.cmd",
        "/bin/sh",
        "--architecture",
        image::Arch::host_or_default().name(),
        "--os",
        "linux",
    ]))?;
    Ok(lay)
}

/// splitmix64: deterministic content without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Files like a distribution's: mostly small, a few large; text (compresses
/// well), machine code-like bytes (about 2:1) and some incompressible
/// data; a few owners, modes and symlinks.
fn generate_tree(root: &Path, bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let mut rng = Rng(0x6268_6174_7469);
    let words: Vec<String> = (0..512)
        .map(|_| {
            let len = 2 + rng.below(9) as usize;
            (0..len)
                .map(|_| (b'a' + rng.below(26) as u8) as char)
                .collect()
        })
        .collect();
    let tops = ["usr", "etc", "opt", "var", "srv"];
    let mut written = 0u64;
    let mut n = 0u64;
    let mut buf = Vec::new();
    while written < bytes {
        let top = tops[rng.below(tops.len() as u64) as usize];
        let d = root.join(format!("{top}/d{:02}/s{:02}", rng.below(16), rng.below(8)));
        std::fs::create_dir_all(&d)?;
        let size = match rng.below(1000) {
            0..=699 => 200 + rng.below(8 << 10),
            700..=949 => (8 << 10) + rng.below(56 << 10),
            950..=994 => (64 << 10) + rng.below(960 << 10),
            _ => (1 << 20) + rng.below(7 << 20),
        }
        .min(bytes - written + 200);
        buf.clear();
        match rng.below(10) {
            0..=5 => {
                while (buf.len() as u64) < size {
                    buf.extend_from_slice(words[rng.below(512) as usize].as_bytes());
                    buf.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
                }
            }
            6..=8 => {
                while (buf.len() as u64) < size {
                    let x = rng.next();
                    for b in x.to_le_bytes() {
                        buf.push(if b < 128 { 0 } else { b });
                    }
                }
            }
            _ => {
                while (buf.len() as u64) < size {
                    buf.extend_from_slice(&rng.next().to_le_bytes());
                }
            }
        }
        buf.truncate(size as usize);
        let p = d.join(format!("f{n}"));
        let mut f = std::fs::File::create(&p)?;
        f.write_all(&buf)?;
        let mode = if rng.below(8) == 0 { 0o755 } else { 0o644 };
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if rng.below(20) == 0 {
            std::os::unix::fs::fchown(&f, Some(1000), Some(1000))?;
        }
        if rng.below(30) == 0 {
            std::os::unix::fs::symlink(format!("f{n}"), d.join(format!("l{n}")))?;
        }
        written += size;
        n += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_trees_are_deterministic_and_sized() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        generate_tree(a.path(), 2 << 20).unwrap();
        generate_tree(b.path(), 2 << 20).unwrap();
        let (ua, ub) = (
            image::tree_usage(a.path()).unwrap(),
            image::tree_usage(b.path()).unwrap(),
        );
        assert_eq!(ua, ub);
        assert!(ua.block_bytes >= 2 << 20, "{ua:?}");
        let (tops, units) = split_units(a.path()).unwrap();
        assert!(!tops.is_empty() && units.len() > tops.len());
    }
}
