//! `bhatti image build`: the kernel, the initramfs (with a static lohar as
//! `/init`) and the rootfs tiers, built into the data directory with a
//! progress line per step. Cached artifacts are skipped unless `--force`.
//! `bhatti image pull|import|list|rm`: OCI images (docs/images.md).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use image::{
    Arch, BuildOptions, ImageBuilder, ImageProgress, Layout, Outcome, ProgressEvent, Selection,
    Tier,
};

/// Environment variable naming the static lohar for amd64 initramfses.
pub const LOHAR_STATIC_ENV: &str = "BHATTI_LOHAR_STATIC";
/// Environment variable naming the static lohar for arm64 initramfses.
pub const LOHAR_STATIC_ARM64_ENV: &str = "BHATTI_LOHAR_STATIC_ARM64";

/// The environment variable naming the static lohar for `arch` guests.
pub fn lohar_static_env(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => LOHAR_STATIC_ENV,
        Arch::Arm64 => LOHAR_STATIC_ARM64_ENV,
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Build (or confirm cached) the kernel, initramfs and rootfs tiers
    /// (on the server, into the data directory).
    Build(BuildArgs),
    /// Make your template of an image on the daemon: booted once, agent
    /// ready, captured; creates of that image and shape then restore from
    /// it instead of booting.
    Warm(cli::WarmArgs),
    /// Pull an OCI image from a registry: as your image, through the
    /// daemon; with --data-dir, into that data directory (on the server,
    /// an image every user may boot).
    Pull(PullArgs),
    /// Import a `docker save` archive or an OCI-layout tar: as your image,
    /// through the daemon; with --data-dir, into that data directory.
    Import(ImportArgs),
    /// List the images you can boot (with --data-dir: the tiers and the
    /// server's OCI images in that data directory).
    #[command(alias = "ls")]
    List(ListArgs),
    /// Show one image: source, digest, size, owner, Env, WorkingDir,
    /// User, Entrypoint, Cmd.
    Inspect { name: String },
    /// Save a sandbox's disk state as a new image of yours.
    Save {
        /// Sandbox name or id.
        sandbox: String,
        /// The new image's name.
        name: String,
    },
    /// Delete one of your images (with --data-dir: a server image in that
    /// data directory). Cached blobs stay.
    #[command(alias = "rm", alias = "remove")]
    Delete(RemoveArgs),
    /// Share an image with every user (admin key).
    Share {
        name: String,
        /// Whose image (a user's name; default: yours).
        #[arg(long)]
        owner: Option<String>,
    },
    /// Stop sharing an image (admin key).
    Unshare {
        name: String,
        /// Whose image (a user's name; default: yours).
        #[arg(long)]
        owner: Option<String>,
    },
}

/// Where the images are, for the server-side OCI commands: given, the
/// command works on that data directory and not through the daemon.
#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// Work on this data directory (images go to DIR/images) instead of
    /// through the daemon: server images, every user's to boot.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Guest architecture (with --data-dir; default: the host's).
    #[arg(long, value_name = "ARCH", requires = "data_dir")]
    arch: Option<Arch>,
}

impl DataArgs {
    fn layout(&self, dir: &Path) -> Layout {
        Layout::for_arch(dir, self.arch.unwrap_or_else(Arch::host_or_default))
    }
}

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    #[command(flatten)]
    pull: cli::ImagePullArgs,
    /// Most bytes to download (blobs not already cached; with
    /// --data-dir: through the daemon, your disk quota bounds it).
    #[arg(long, value_name = "BYTES", requires = "data_dir")]
    max_download: Option<u64>,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    #[command(flatten)]
    import: cli::ImageImportArgs,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    /// The image's name.
    name: String,
    #[command(flatten)]
    data: DataArgs,
}

/// What `bhatti image …` does: a server-side command on a data directory,
/// or a client command through the daemon.
pub enum Routed {
    Server(ImageCommand),
    Client(cli::Command),
}

/// Sends the commands without --data-dir (and warm, inspect, save,
/// share, unshare) to the daemon.
pub fn route(cmd: ImageCommand) -> Routed {
    use cli::ImageClientCommand as C;
    let client = |c| Routed::Client(cli::Command::Image(c));
    match cmd {
        ImageCommand::Warm(w) => Routed::Client(cli::Command::ImageWarm(w)),
        ImageCommand::Inspect { name } => client(C::Inspect { name }),
        ImageCommand::Save { sandbox, name } => client(C::Save { sandbox, name }),
        ImageCommand::Share { name, owner } => client(C::Share { name, owner }),
        ImageCommand::Unshare { name, owner } => client(C::Unshare { name, owner }),
        ImageCommand::Pull(a) if a.data.data_dir.is_none() => client(C::Pull(a.pull)),
        ImageCommand::Import(a) if a.data.data_dir.is_none() => client(C::Import(a.import)),
        ImageCommand::List(a) if a.data.data_dir.is_none() => client(C::List),
        ImageCommand::Delete(a) if a.data.data_dir.is_none() => client(C::Delete { name: a.name }),
        other => Routed::Server(other),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TierArg {
    /// busybox only (fast; for tests)
    Tiny,
    /// Debian bookworm with the usual tools (the default image)
    Minimal,
    /// minimal plus headless Chromium, fonts and Python Playwright
    Browser,
    /// minimal plus Docker Engine, started at boot
    Docker,
    /// every tier
    All,
}

impl From<TierArg> for Selection {
    fn from(t: TierArg) -> Selection {
        match t {
            TierArg::Tiny => Selection::Tier(Tier::Tiny),
            TierArg::Minimal => Selection::Tier(Tier::Minimal),
            TierArg::Browser => Selection::Tier(Tier::Browser),
            TierArg::Docker => Selection::Tier(Tier::Docker),
            TierArg::All => Selection::All,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Which rootfs tier(s) to build; the kernel and initramfs always are.
    #[arg(long, value_enum, default_value = "minimal")]
    tier: TierArg,
    /// The data directory (images go to DIR/images).
    #[arg(long, value_name = "DIR", default_value = image::layout::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Rebuild even what is cached and current.
    #[arg(long)]
    force: bool,
    /// Guest architecture: amd64 or arm64 (default: the host's). Another
    /// than the host's builds into DIR/images/<arch>/ from Debian's
    /// packages of that architecture (`dpkg --add-architecture` first);
    /// only the tiny tier can be built for a foreign architecture.
    #[arg(long, value_name = "ARCH")]
    arch: Option<Arch>,
    /// The statically linked lohar to put in the initramfs (default:
    /// $BHATTI_LOHAR_STATIC for amd64, $BHATTI_LOHAR_STATIC_ARM64 for
    /// arm64, else a static `lohar` beside this binary — `lohar-<arch>`
    /// for an architecture other than the host's).
    #[arg(long, value_name = "PATH")]
    lohar: Option<PathBuf>,
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build(args) => build(args),
        ImageCommand::Pull(args) => pull(args),
        ImageCommand::Import(args) => import(args),
        ImageCommand::List(args) => list(args),
        ImageCommand::Delete(args) => remove(args),
        // Client commands: `route` hands them to the CLI.
        _ => bail!("this `bhatti image` command talks to the daemon"),
    }
}

/// The data directory of a server-side command.
fn data_dir(d: &DataArgs) -> anyhow::Result<&Path> {
    d.data_dir
        .as_deref()
        .context("a server-side image command needs --data-dir")
}

/// A server image's name: an image name, and not the prefix of the
/// daemon's own directories (`i.…`, its API images).
fn check_server_name(name: &str) -> anyhow::Result<()> {
    image::oci::validate_name(name)?;
    if name.starts_with("i.") {
        bail!("invalid image name '{name}': names starting with 'i.' are the daemon's");
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn pull(args: PullArgs) -> anyhow::Result<()> {
    use image::oci::registry::PullEvent;
    use image::oci::{Credentials, Limits, OciImages, PullOptions, Puller, Reference};
    let dir = data_dir(&args.data)?;
    let p = &args.pull;
    let reference = Reference::parse(&p.reference)?;
    let name = p.name.clone().unwrap_or_else(|| reference.default_name());
    check_server_name(&name)?;
    let credentials = match (&p.username, p.token_env) {
        (Some(user), _) => {
            let password = if p.password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("reading the password from stdin")?;
                line.trim_end_matches(['\n', '\r']).to_owned()
            } else {
                std::env::var("BHATTI_REGISTRY_PASSWORD").map_err(|_| {
                    anyhow::anyhow!(
                        "--username needs a password: $BHATTI_REGISTRY_PASSWORD or --password-stdin"
                    )
                })?
            };
            Credentials::Basic {
                username: user.clone(),
                password,
            }
        }
        (None, true) => Credentials::Token(
            std::env::var("BHATTI_REGISTRY_TOKEN")
                .map_err(|_| anyhow::anyhow!("--token-env: $BHATTI_REGISTRY_TOKEN is not set"))?,
        ),
        (None, false) => Credentials::Anonymous,
    };
    let images = OciImages::new(args.data.layout(dir));
    let opts = PullOptions {
        insecure: p.insecure,
        credentials,
        limits: Limits {
            download_bytes: args
                .max_download
                .unwrap_or(Limits::default().download_bytes),
            ..Limits::default()
        },
        // The admin's pull on the server: any address (users' pulls
        // through the daemon are held to the sandboxes' egress rules).
        addresses: None,
    };
    println!("pulling {reference} as '{name}'");
    let started = Instant::now();
    let mut puller = Puller::new(images, opts)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let mut cached = 0u64;
    let img = rt.block_on(puller.pull(&reference, &name, &mut |e| match e {
        PullEvent::Manifest { digest, layers, .. } => {
            println!("    manifest {digest} ({layers} layers)")
        }
        PullEvent::Cached { digest, size } => {
            cached += size;
            println!("    {digest}: cached ({})", mib(size))
        }
        PullEvent::Downloaded { digest, size } => {
            println!("    {digest}: downloaded and verified ({})", mib(size))
        }
        PullEvent::Building => println!("    building the root filesystem"),
    }))?;
    println!(
        "pulled {reference} as '{}' in {:.1}s: downloaded {}, {} from the cache, rootfs {}",
        img.name,
        started.elapsed().as_secs_f64(),
        mib(puller.downloaded_bytes),
        mib(cached),
        mib(img.rootfs_bytes)
    );
    Ok(())
}

fn import(args: ImportArgs) -> anyhow::Result<()> {
    let dir = data_dir(&args.data)?;
    let a = &args.import;
    let name = match a.name.clone() {
        Some(n) => n,
        None => a
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .filter(|n| !n.is_empty())
            .map(str::to_ascii_lowercase)
            .context("cannot name the image after the file; pass --name")?,
    };
    check_server_name(&name)?;
    let images = image::oci::OciImages::new(args.data.layout(dir));
    println!("importing {} as '{name}'", a.file.display());
    let started = Instant::now();
    let img = image::oci::import_archive(&images, &a.file, &name, Default::default())?;
    println!(
        "imported '{}' in {:.1}s: {} layers, rootfs {}",
        img.name,
        started.elapsed().as_secs_f64(),
        img.layers.len(),
        mib(img.rootfs_bytes)
    );
    Ok(())
}

fn list(args: ListArgs) -> anyhow::Result<()> {
    let layout = args.data.layout(data_dir(&args.data)?);
    let store = image::ImageStore::new(layout.clone());
    println!("{:<24} {:<8} {:>12}  SOURCE", "NAME", "KIND", "ROOTFS");
    for t in Tier::ALL {
        if let Ok(m) = std::fs::metadata(layout.rootfs(t)) {
            println!(
                "{:<24} {:<8} {:>12}  bhatti image build",
                t.name(),
                "tier",
                mib(m.len())
            );
        }
    }
    // The daemon's own (API images, `i.…`) are listed by `bhatti image list`.
    for img in store
        .oci()
        .list()
        .into_iter()
        .filter(|i| !i.name.starts_with("i."))
    {
        println!(
            "{:<24} {:<8} {:>12}  {}",
            img.name,
            "oci",
            mib(img.rootfs_bytes),
            img.source
        );
    }
    Ok(())
}

fn remove(args: RemoveArgs) -> anyhow::Result<()> {
    check_server_name(&args.name)?;
    let images = image::oci::OciImages::new(args.data.layout(data_dir(&args.data)?));
    if !images.remove(&args.name)? {
        bail!("no OCI image '{}'", args.name);
    }
    println!("removed '{}'", args.name);
    Ok(())
}

fn build(args: BuildArgs) -> anyhow::Result<()> {
    let arch = args.arch.unwrap_or_else(Arch::host_or_default);
    let beside = std::env::current_exe()
        .context("locating this binary")?
        .with_file_name(if arch.is_host() {
            "lohar".to_string()
        } else {
            format!("lohar-{arch}")
        });
    let lohar = find_static_lohar(
        arch,
        args.lohar,
        std::env::var_os(lohar_static_env(arch)).map(PathBuf::from),
        &beside,
    )?;
    let machine = elf_arch(&lohar)?;
    if machine != Some(arch) {
        bail!(
            "{} is built for {}, not for {arch} guests: pass a static lohar built for {} \
             (--lohar PATH or ${})",
            lohar.display(),
            machine.map_or("another machine", Arch::name),
            arch.rust_target(),
            lohar_static_env(arch)
        );
    }
    let layout = Layout::for_arch(&args.data_dir, arch);
    println!(
        "building {arch} images into {} (lohar: {})",
        layout.images_dir().display(),
        lohar.display()
    );
    let started = Instant::now();
    let report = ImageBuilder::new(layout)
        .with_progress(Lines)
        .build(
            args.tier,
            &BuildOptions {
                lohar,
                force: args.force,
            },
        )
        .context("building images")?;
    let built = report
        .steps
        .iter()
        .filter(|s| s.outcome == Outcome::Built)
        .count();
    println!(
        "done in {:.1}s: {built} built, {} cached",
        started.elapsed().as_secs_f64(),
        report.steps.len() - built
    );
    Ok(())
}

/// Prints one line per progress event.
struct Lines;

impl ImageProgress for Lines {
    fn on_event(&self, event: &ProgressEvent) {
        match event {
            ProgressEvent::Started(step) => println!("==> {step}"),
            ProgressEvent::Detail(step, msg) => println!("    {step}: {msg}"),
            ProgressEvent::Finished(r) => {
                let what = match r.outcome {
                    Outcome::Built => "built",
                    Outcome::Cached => "cached",
                };
                println!(
                    "    {}: {what} in {:.1}s — {}",
                    r.step,
                    r.elapsed.as_secs_f64(),
                    r.summary
                );
            }
        }
    }
}

/// The lohar for `arch`'s initramfs: `explicit` (`--lohar`), else
/// `from_env` (`$BHATTI_LOHAR_STATIC`, `$BHATTI_LOHAR_STATIC_ARM64`), else
/// `beside` (next to this binary) if it is statically linked. An explicit
/// choice that is missing or dynamic is an error, never silently replaced.
pub fn find_static_lohar(
    arch: Arch,
    explicit: Option<PathBuf>,
    from_env: Option<PathBuf>,
    beside: &Path,
) -> anyhow::Result<PathBuf> {
    let env = lohar_static_env(arch);
    let how = match arch {
        Arch::Amd64 => "scripts/build-lohar.sh",
        Arch::Arm64 => "scripts/build-lohar.sh arm64",
    };
    let how = format!(
        "build one with {how} (it prints its path) and pass it with --lohar PATH or ${env}"
    );
    if let Some((p, origin)) = explicit
        .map(|p| (p, "--lohar"))
        .or_else(|| from_env.map(|p| (p, env)))
    {
        let is_static =
            is_static_elf(&p).with_context(|| format!("{origin}: cannot read {}", p.display()))?;
        if !is_static {
            bail!(
                "{origin}: {} is dynamically linked; the initramfs has no libraries: {how}",
                p.display()
            );
        }
        return Ok(p);
    }
    match is_static_elf(beside) {
        Ok(true) => Ok(beside.to_path_buf()),
        Ok(false) => bail!(
            "{} is dynamically linked and cannot run as the guest's /init: {how}",
            beside.display()
        ),
        Err(_) => bail!("no static lohar found (none beside this binary): {how}"),
    }
}

/// Whether `path` is an ELF executable without a program interpreter
/// (`PT_INTERP`), i.e. statically linked (static-pie included).
pub fn is_static_elf(path: &Path) -> anyhow::Result<bool> {
    let mut f = std::fs::File::open(path)?;
    let mut hdr = [0u8; 64];
    f.read_exact(&mut hdr)
        .with_context(|| format!("{} is too short for an ELF header", path.display()))?;
    let phdrs = program_header_table(&hdr).with_context(|| format!("{}", path.display()))?;
    let (off, size, count) = phdrs;
    let mut table = vec![0u8; size * count];
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(&mut table)
        .with_context(|| format!("{}: truncated program headers", path.display()))?;
    const PT_INTERP: u32 = 3;
    Ok(!table
        .chunks_exact(size)
        .any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP))
}

/// The architecture an ELF file is built for (`e_machine`); `None` for
/// another machine.
pub fn elf_arch(path: &Path) -> anyhow::Result<Option<Arch>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hdr = [0u8; 20];
    f.read_exact(&mut hdr)
        .with_context(|| format!("{} is too short for an ELF header", path.display()))?;
    if &hdr[..4] != b"\x7fELF" {
        bail!("{} is not an ELF file", path.display());
    }
    const EM_X86_64: u16 = 62;
    const EM_AARCH64: u16 = 183;
    Ok(match u16::from_le_bytes([hdr[18], hdr[19]]) {
        EM_X86_64 => Some(Arch::Amd64),
        EM_AARCH64 => Some(Arch::Arm64),
        _ => None,
    })
}

/// Offset, entry size and count of the program headers of a 64-bit
/// little-endian ELF.
fn program_header_table(hdr: &[u8; 64]) -> anyhow::Result<(u64, usize, usize)> {
    if &hdr[..4] != b"\x7fELF" {
        bail!("not an ELF file");
    }
    if hdr[4] != 2 || hdr[5] != 1 {
        bail!("not a 64-bit little-endian ELF");
    }
    let u16_at = |o: usize| u16::from_le_bytes([hdr[o], hdr[o + 1]]) as usize;
    let mut off = [0u8; 8];
    off.copy_from_slice(&hdr[0x20..0x28]);
    let size = u16_at(0x36);
    if size < 4 {
        bail!("program header entries of {size} bytes");
    }
    Ok((u64::from_le_bytes(off), size, u16_at(0x38)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with the given program header types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 2;
        v[5] = 1;
        v[18] = 183; // EM_AARCH64
        v[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        v[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        v[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            v.extend(ph);
        }
        v
    }

    #[test]
    fn static_and_dynamic_elves() {
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = d.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        assert!(is_static_elf(&write("static", &elf(&[1, 1, 4]))).unwrap());
        assert!(!is_static_elf(&write("dynamic", &elf(&[6, 3, 1]))).unwrap());
        assert!(is_static_elf(&write("text", b"#!/bin/sh\n")).is_err());
        let mut cut = elf(&[1, 3]);
        cut.truncate(100);
        assert!(is_static_elf(&write("cut", &cut)).is_err());
        // This test binary is a normal dynamically linked executable.
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
        assert_eq!(elf_arch(&me).unwrap(), Arch::host());
        assert_eq!(
            elf_arch(&write("arm", &elf(&[1]))).unwrap(),
            Some(Arch::Arm64)
        );
        assert!(elf_arch(&write("text2", b"#!/bin/sh\n")).is_err());
    }

    #[test]
    fn lohar_lookup_order_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let stat = d.path().join("static");
        std::fs::write(&stat, elf(&[1])).unwrap();
        let dynamic = d.path().join("dynamic");
        std::fs::write(&dynamic, elf(&[3])).unwrap();
        let none = d.path().join("none");

        let pick = |e: Option<&Path>, env: Option<&Path>, beside: &Path| {
            find_static_lohar(
                Arch::Amd64,
                e.map(Path::to_path_buf),
                env.map(Path::to_path_buf),
                beside,
            )
        };
        assert_eq!(pick(Some(&stat), Some(&dynamic), &none).unwrap(), stat);
        assert_eq!(pick(None, Some(&stat), &dynamic).unwrap(), stat);
        assert_eq!(pick(None, None, &stat).unwrap(), stat);
        let e = pick(Some(&dynamic), Some(&stat), &stat).unwrap_err();
        assert!(format!("{e:#}").contains("--lohar") && format!("{e:#}").contains("dynamically"));
        let e = pick(None, Some(&none), &stat).unwrap_err();
        assert!(format!("{e:#}").contains(LOHAR_STATIC_ENV), "{e:#}");
        for beside in [&dynamic, &none] {
            let e = pick(None, None, beside).unwrap_err();
            assert!(format!("{e:#}").contains("scripts/build-lohar.sh"), "{e:#}");
        }
        let e = find_static_lohar(Arch::Arm64, None, None, &none).unwrap_err();
        assert!(
            format!("{e:#}").contains("build-lohar.sh arm64")
                && format!("{e:#}").contains(LOHAR_STATIC_ARM64_ENV),
            "{e:#}"
        );
    }
}
