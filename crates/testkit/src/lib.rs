//! Test support shared by the VM and network suites.
//!
//! * [`Netns`]: a network namespace made by the test (`ip netns add`) that
//!   the calling test thread enters; everything the thread then starts
//!   (QEMU, `ip`, sockets) lives in it. Removed on drop.
//! * [`static_lohar`]: the statically linked agent that goes into the initramfs.
//! * [`host_lohar`]: the host build of the agent, the fake engine's guest.
//! * [`images`]: guest images built once per machine into a shared cache.
//! * [`wait_until`]: poll a condition with a deadline; a hang becomes a named failure.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use image::{Arch, BuildOptions, ImageBuilder, ImageStore, Layout, ResolvedImage, Tier};

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace created by this test and entered by the calling
/// thread. Dropping it returns the thread to its old namespace and deletes
/// the namespace (with everything left in it: bridges, TAPs, routes).
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    original: File,
}

impl Netns {
    /// Creates `bt-<tag>-<pid>-<n>` and moves the current thread into it,
    /// with loopback up. Must be called before the test starts any
    /// runtime threads that should live in it.
    pub fn enter(tag: &str) -> Netns {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("bt-{tag}-{}-{n}", std::process::id());
        assert!(name.len() < 64);
        run("ip", &["netns", "add", &name]);
        let original = File::open("/proc/thread-self/ns/net").expect("own netns");
        // The first namespace any test thread left is the one with a way
        // out: image builds go back there (see `images`).
        OUTSIDE.get_or_init(|| File::open("/proc/thread-self/ns/net").expect("own netns"));
        let target = File::open(format!("/var/run/netns/{name}")).expect("new netns");
        nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("entering the test netns");
        run("ip", &["link", "set", "lo", "up"]);
        Netns { name, original }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) =
            nix::sched::setns(self.original.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        {
            eprintln!("warning: cannot leave netns {}: {e}", self.name);
        }
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !out.is_ok_and(|o| o.status.success()) {
            eprintln!("warning: cannot delete netns {}", self.name);
        }
    }
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("workspace root")
        .to_path_buf()
}

/// The statically linked lohar for the initramfs: `$BHATTI_LOHAR_STATIC`,
/// or what `scripts/build-lohar.sh` (run by `scripts/test.sh`) produced.
pub fn static_lohar() -> PathBuf {
    if let Some(p) = std::env::var_os("BHATTI_LOHAR_STATIC") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let p = target.join("x86_64-unknown-linux-gnu/release/lohar");
    assert!(
        p.is_file(),
        "no static lohar at {}: run scripts/build-lohar.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Environment variable naming the static aarch64 lohar for arm64 images
/// (`scripts/build-lohar.sh arm64` builds it; scripts/test.sh exports it).
pub const LOHAR_STATIC_ARM64_VAR: &str = "BHATTI_LOHAR_STATIC_ARM64";

/// The statically linked lohar for `arch` guests: [`static_lohar`] for
/// amd64; for arm64 `$BHATTI_LOHAR_STATIC_ARM64`, or what
/// `scripts/build-lohar.sh arm64` left under the target directory. `None`
/// when there is none (the caller decides whether that is a skip).
pub fn static_lohar_for(arch: Arch) -> Option<PathBuf> {
    match arch {
        Arch::Amd64 => Some(static_lohar()),
        Arch::Arm64 => {
            if let Some(p) = std::env::var_os(LOHAR_STATIC_ARM64_VAR) {
                return Some(PathBuf::from(p));
            }
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"));
            Some(target.join("aarch64-unknown-linux-gnu/release/lohar")).filter(|p| p.is_file())
        }
    }
}

/// The host build of lohar (`target/debug/lohar` beside the running test
/// binary), which the fake engine runs as its guest: `$BHATTI_LOHAR`, or
/// that file when it is newer than every source of lohar and proto. Panics
/// with the command to run when it is missing or stale (`cargo test -p X`
/// builds only X's binaries; `scripts/test.sh` builds the workspace first).
pub fn host_lohar() -> PathBuf {
    if let Some(p) = std::env::var_os("BHATTI_LOHAR") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    // <target>/debug/deps/<test>-<hash> → <target>/debug/lohar
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("lohar"))
        .expect("the test binary is in <target>/<profile>/deps");
    let built = std::fs::metadata(&p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "no host lohar at {} ({e}): run `cargo build -p lohar` first",
                p.display()
            )
        });
    let root = workspace_root();
    for src in ["crates/lohar/src", "crates/proto/src"] {
        if let Some(newer) = newer_than(&root.join(src), built) {
            panic!(
                "{} is older than {}: run `cargo build -p lohar` first",
                p.display(),
                newer.display()
            );
        }
    }
    p
}

/// A file under `dir` modified after `t`, if any.
fn newer_than(dir: &Path, t: std::time::SystemTime) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let meta = entry.metadata().ok()?;
        if meta.is_dir() {
            if let Some(p) = newer_than(&path, t) {
                return Some(p);
            }
        } else if meta.modified().is_ok_and(|m| m > t) {
            return Some(path);
        }
    }
    None
}

/// Where test images are cached across test binaries and runs.
pub fn image_cache() -> PathBuf {
    std::env::var_os("BHATTI_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/bhatti-test/data"))
}

/// The network namespace the process was in before any test entered one
/// of its own (set by the first [`Netns::enter`]).
static OUTSIDE: OnceLock<File> = OnceLock::new();

/// Builds (or reuses) the kernel, the initramfs with the current static
/// lohar, and `tier`, in the shared cache; safe across threads and processes.
///
/// A build fetches Debian packages, so it runs on a thread of its own in
/// the namespace the process started in: a test thread that already
/// entered its [`Netns`] (which has no way out) may call this.
pub fn images(tier: Tier) -> ResolvedImage {
    images_in(&image_cache(), tier)
}

/// [`images`] into the cache directory `dir`.
pub fn images_in(dir: &Path, tier: Tier) -> ResolvedImage {
    images_for_in(dir, Arch::host_or_default(), tier, static_lohar())
}

/// [`images`] for `arch` guests, with `lohar` (built for `arch`) as
/// `/init`: arm64 images go to `images/arm64/` of the same cache.
pub fn images_for(arch: Arch, tier: Tier, lohar: PathBuf) -> ResolvedImage {
    images_for_in(&image_cache(), arch, tier, lohar)
}

fn images_for_in(dir: &Path, arch: Arch, tier: Tier, lohar: PathBuf) -> ResolvedImage {
    let dir = dir.to_path_buf();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(outside) = OUTSIDE.get() {
                    nix::sched::setns(outside.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("returning to the outside namespace to build images");
                }
                build_images(&dir, arch, tier, lohar)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn build_images(dir: &Path, arch: Arch, tier: Tier, lohar: PathBuf) -> ResolvedImage {
    static BUILD: Mutex<()> = Mutex::new(());
    let _in_process = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let dir = dir.to_path_buf();
    std::fs::create_dir_all(&dir).expect("image cache dir");
    let lock = File::create(dir.join(".build.lock")).expect("lock file");
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map(|guard| {
            let layout = Layout::for_arch(&dir, arch);
            ImageBuilder::new(layout.clone())
                .build(
                    tier,
                    &BuildOptions {
                        lohar,
                        force: false,
                    },
                )
                .unwrap_or_else(|e| {
                    panic!("building the {arch} {} image: {}", tier.name(), chain(&e))
                });
            let resolved = ImageStore::new(layout)
                .resolve(tier.name())
                .expect("resolving a just-built image");
            drop(guard);
            resolved
        })
        .unwrap_or_else(|(_, e)| panic!("locking the image cache: {e}"))
}

/// An error and its sources, so a panic says why ("No space left on
/// device"), not only what failed.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `deadline`.
pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether this process runs as root (the VM and network suites need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The variable `scripts/test.sh` sets: there, a test that cannot run its
/// VM or namespace part fails rather than skips.
pub const MUST_RUN_VAR: &str = "BHATTI_TESTS_MUST_RUN";

/// Reports that a test cannot run here because of `reason`: under
/// `scripts/test.sh` (see [`MUST_RUN_VAR`]) this panics, so the suite fails;
/// elsewhere (a developer's plain `cargo test`) it prints `SKIP …` and the
/// caller returns. A printed SKIP is never a pass to report.
pub fn cannot_run(reason: &str) {
    if std::env::var_os(MUST_RUN_VAR).is_some_and(|v| v == "1") {
        panic!("{reason} ({MUST_RUN_VAR}=1: a test that cannot run fails here)");
    }
    println!("SKIP {reason}");
}

/// Placeholder files where the image store looks for the kernel, the
/// initramfs and the `tiny` rootfs under `data`: enough for a daemon on the
/// fake engine, which boots none of them.
pub fn placeholder_images(data: &Path) {
    for rel in [
        "images/kernel/vmlinux",
        "images/kernel/vmlinuz",
        "images/kernel/manifest.json",
        "images/initramfs/initramfs.cpio",
        "images/initramfs/manifest.json",
        "images/tiny/rootfs.ext4",
        "images/tiny/manifest.json",
    ] {
        let to = data.join(rel);
        std::fs::create_dir_all(to.parent().expect("a parent")).expect("image dir");
        std::fs::write(&to, b"placeholder").expect("placeholder image file");
    }
    std::fs::write(data.join("images/kernel/release"), "6.1.0-test\n").expect("kernel release");
}

/// A fresh data directory whose `images/` links to the shared image cache
/// (built for `tier` first): what a test daemon's `data_dir` needs.
pub fn data_dir_with_images(tier: Tier) -> tempfile::TempDir {
    images(tier);
    let dir = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::symlink(image_cache().join("images"), dir.path().join("images"))
        .expect("linking the image cache");
    dir
}

/// [`data_dir_with_images`] for `arch` guests: builds `arch`'s images
/// (with `lohar`, built for `arch`) into the shared cache first; the link
/// covers `images/<arch>/` too.
pub fn data_dir_with_images_for(arch: Arch, tier: Tier, lohar: PathBuf) -> tempfile::TempDir {
    images_for(arch, tier, lohar);
    let dir = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::symlink(image_cache().join("images"), dir.path().join("images"))
        .expect("linking the image cache");
    dir
}
