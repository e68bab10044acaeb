//! Test support: a guest kernel fetched once from Debian's package
//! registry and cached, the QEMU binary, and condition waits with
//! deadlines.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// Where kernels are cached between runs.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("BHATTI_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/bhatti-test"))
}

/// The Debian cloud kernel as shipped (a bzImage), downloaded with
/// `apt-get download` on first use. `BHATTI_TEST_BZIMAGE` overrides.
pub fn bzimage() -> PathBuf {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| {
        if let Some(p) = std::env::var_os("BHATTI_TEST_BZIMAGE") {
            return PathBuf::from(p);
        }
        fetch_bzimage().expect(
            "fetching the test kernel (apt packages needed: apt, dpkg; network: Debian mirror)",
        )
    })
    .clone()
}

/// The uncompressed ELF `vmlinux` inside [`bzimage`] (PVH entry: what
/// production boots), extracted once with the `lz4` tool.
/// `BHATTI_TEST_VMLINUX` overrides.
pub fn vmlinux() -> PathBuf {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| {
        if let Some(p) = std::env::var_os("BHATTI_TEST_VMLINUX") {
            return PathBuf::from(p);
        }
        extract_vmlinux(&bzimage()).expect("extracting vmlinux (apt package needed: lz4)")
    })
    .clone()
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The versioned kernel package the `linux-image-cloud-amd64` metapackage
/// depends on.
fn kernel_package() -> Result<String> {
    let find = || -> Result<Option<String>> {
        let deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
        Ok(deps.lines().find_map(|l| {
            let dep = l.trim().strip_prefix("Depends: ")?;
            dep.starts_with("linux-image-")
                .then(|| dep.trim().to_string())
        }))
    };
    if let Ok(Some(p)) = find() {
        return Ok(p);
    }
    // A machine whose package lists were never fetched.
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    find()?.context("linux-image-cloud-amd64 has no linux-image dependency")
}

fn fetch_bzimage() -> Result<PathBuf> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache)?;
    if let Some(k) = cached(&cache, "vmlinuz-")? {
        return Ok(k);
    }
    let pkg = kernel_package()?;
    let work = tempfile::tempdir_in(&cache)?;
    run(Command::new("apt-get")
        .args(["download", &pkg])
        .current_dir(work.path()))?;
    let deb = std::fs::read_dir(work.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let boot = tree.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no /boot/vmlinuz-* in the package")?;
    let dest = cache.join(vmlinuz.file_name().unwrap());
    // Rename is atomic: a concurrent test binary sees all or nothing.
    std::fs::rename(&vmlinuz, &dest)?;
    Ok(dest)
}

fn cached(cache: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    Ok(std::fs::read_dir(cache)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        }))
}

/// Finds the LZ4 (legacy frame) payload in a bzImage and decompresses it.
fn extract_vmlinux(bz: &Path) -> Result<PathBuf> {
    let name = bz
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace("vmlinuz-", "vmlinux-");
    let dest = bz.with_file_name(name);
    if dest.is_file() {
        return Ok(dest);
    }
    let data = std::fs::read(bz)?;
    let magic = [0x02, 0x21, 0x4c, 0x18];
    let off = data
        .windows(4)
        .position(|w| w == magic)
        .context("no LZ4 payload in the bzImage (kernel not LZ4-compressed?)")?;
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    let payload = tmp.with_extension("lz4");
    std::fs::write(&payload, &data[off..])?;
    // lz4 complains about the bytes after the frame and exits non-zero;
    // the output is complete, which the ELF check below confirms.
    let status = Command::new("lz4")
        .args(["-d", "-c", "-q"])
        .arg(&payload)
        .stdout(std::fs::File::create(&tmp)?)
        .stderr(std::process::Stdio::null())
        .status()
        .context("running lz4")?;
    std::fs::remove_file(&payload)?;
    let head = std::fs::read(&tmp)?.into_iter().take(4).collect::<Vec<_>>();
    if head != b"\x7fELF" {
        bail!(
            "lz4 ({status}) did not produce an ELF from {}",
            bz.display()
        );
    }
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}

/// Polls `cond` until it is true or `limit` passes; the error names `what`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The file's content as text (empty if missing).
pub fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Median of the samples.
pub fn p50(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}
