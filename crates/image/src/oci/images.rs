//! OCI images on disk: `DATA/images/oci/<name>/{rootfs.ext4,
//! manifest.json, image.json}` beside the blob cache
//! `DATA/images/oci/blobs/`. Building one applies its layers to a staging
//! root and packs it with `mkfs.ext4 -d` into a read-only base like the
//! tiers'; the kernel, the initramfs and lohar stay bhatti's own.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::blobs::BlobStore;
use super::error::{io, OciError};
use super::spec::{ImageConfigBlob, RunConfig};
use super::unpack::{apply_layer, open_layer};
use crate::fsutil::{replace_dir, Staging};
use crate::layout::{Layout, Tier, MANIFEST};
use crate::manifest::{Inputs, Manifest};
use crate::rootfs::pack_rootfs;

/// The image description stored beside its rootfs.
pub const IMAGE_JSON: &str = "image.json";
/// The base filesystem's label (lohar takes any `bhatti-*` but `-disk`
/// and `-config` as the base).
pub const OCI_LABEL: &str = "bhatti-oci";
const RECIPE: u32 = 1;

/// What `image.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciImage {
    /// The local name.
    pub name: String,
    /// Where it came from: a reference, or `import:<file>`.
    pub source: String,
    /// Digest of the image manifest (or of the config, for a docker-archive).
    pub digest: String,
    /// The image's architecture.
    pub architecture: String,
    /// Env, WorkingDir, User, Entrypoint, Cmd.
    pub config: RunConfig,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// Digest of the config blob, when it came from the blob cache (kept
    /// there with the layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Size of `rootfs.ext4`.
    pub rootfs_bytes: u64,
    /// When it was built (Unix seconds).
    pub created_unix: u64,
}

/// Where an image being built comes from (recorded in its `image.json`).
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// A reference, `import`, `save:<sandbox>`…
    pub source: &'a str,
    /// The manifest's digest (a docker-archive's: its config's).
    pub digest: &'a str,
    /// The config blob's digest, when it is in the blob cache.
    pub config_digest: Option<&'a str>,
}

/// The OCI images of one data directory (and architecture).
#[derive(Debug, Clone)]
pub struct OciImages {
    layout: Layout,
}

/// Checks a local image name: `[a-z0-9][a-z0-9._-]*`, at most 64, not a
/// tier's name.
pub fn validate_name(name: &str) -> Result<(), OciError> {
    let bad = |reason| OciError::BadName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("1 to 64 characters"));
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !first_ok
        || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
    {
        return Err(bad(
            "lowercase letters, digits, '.', '_' and '-', starting with a letter or digit",
        ));
    }
    if Tier::from_name(name).is_some() {
        return Err(bad("that is a built-in tier's name"));
    }
    if name == "blobs" {
        return Err(bad("reserved"));
    }
    Ok(())
}

impl OciImages {
    /// The OCI images under `layout`.
    pub fn new(layout: Layout) -> Self {
        Self { layout }
    }

    /// The guests' architecture.
    pub fn arch(&self) -> crate::layout::Arch {
        self.layout.arch()
    }

    /// `DATA/images/oci`.
    pub fn dir(&self) -> PathBuf {
        self.layout.images_dir().join("oci")
    }

    /// The blob cache.
    pub fn blobs(&self) -> BlobStore {
        BlobStore::new(self.dir().join("blobs"))
    }

    /// `DATA/images/oci/<name>`.
    pub fn image_dir(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// Holds the blob cache in use (shared) while a pull or an import
    /// runs, in this process or another: [`Self::collect_garbage`] never
    /// removes a blob under it.
    pub fn use_blobs(&self) -> Result<BlobLock, OciError> {
        BlobLock::take(&self.dir().join("blobs"), false)
            .map(|l| l.expect("a blocking lock is taken"))
    }

    /// Removes every cached blob no image's layers name (a deleted image's,
    /// a failed pull's, an import's config and manifest), and temporary
    /// files of writes that never finished. Skipped (`Ok(None)`) while a
    /// pull or an import holds the cache ([`Self::use_blobs`]); else the
    /// blobs and bytes removed.
    pub fn collect_garbage(&self) -> Result<Option<(usize, u64)>, OciError> {
        let Some(_exclusive) = BlobLock::take(&self.dir().join("blobs"), true)? else {
            return Ok(None);
        };
        let keep: std::collections::HashSet<String> = self
            .list()
            .into_iter()
            .flat_map(|i| i.layers.into_iter().chain(i.config_digest))
            .filter_map(|d| d.strip_prefix("sha256:").map(str::to_owned))
            .collect();
        let dir = self.dir().join("blobs").join("sha256");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(Some((0, 0)));
        };
        let (mut n, mut bytes) = (0, 0);
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            let p = e.path();
            std::fs::remove_file(&p).map_err(io("remove", &p))?;
            n += 1;
            bytes += len;
        }
        Ok(Some((n, bytes)))
    }

    /// The image's read-only base.
    pub fn rootfs(&self, name: &str) -> PathBuf {
        self.image_dir(name).join("rootfs.ext4")
    }

    /// The image's description, if it exists and is complete.
    pub fn get(&self, name: &str) -> Option<OciImage> {
        validate_name(name).ok()?;
        let dir = self.image_dir(name);
        if !dir.join("rootfs.ext4").is_file() || !dir.join(MANIFEST).is_file() {
            return None;
        }
        let text = std::fs::read(dir.join(IMAGE_JSON)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Every complete image, by name.
    pub fn list(&self) -> Vec<OciImage> {
        let Ok(rd) = std::fs::read_dir(self.dir()) else {
            return vec![];
        };
        let mut out: Vec<OciImage> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| self.get(&e.file_name().to_string_lossy()))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Builds image `name` from `layers` (blob files, bottom first, plain
    /// or gzip tar) and its config, replacing an image of that name.
    /// `budget`: the most bytes of unpacked content allowed.
    pub fn build(
        &self,
        name: &str,
        origin: Origin<'_>,
        config: &ImageConfigBlob,
        layers: &[(String, PathBuf)],
        budget: u64,
    ) -> Result<OciImage, OciError> {
        let Origin {
            source,
            digest,
            config_digest,
        } = origin;
        validate_name(name)?;
        let start = Instant::now();
        let build_dir = self.layout.build_dir();
        std::fs::create_dir_all(&build_dir).map_err(io("create directory", &build_dir))?;
        let staging = Staging::new(&build_dir, &format!("oci-{name}"))?;
        // The tree is staged in RAM when it fits with room to spare (tens
        // of thousands of files made and removed on a disk cost far more
        // than mkfs itself), else beside the output; a RAM attempt that
        // runs out of room is done again on disk.
        let mut ram = ram_staging(layers);
        let root = loop {
            let root = match &ram {
                Some(dir) => dir.path().join("root"),
                None => staging.path().join("root"),
            };
            // In RAM, the unpack may not take more than was reserved for
            // it: a layer whose gzip trailer lies cannot fill the host's
            // memory (it is redone on disk under the caller's budget).
            let (limit, ram_bound) = unpack_limit(ram.as_ref().map(|a| a.bytes), budget);
            match apply_layers(&root, layers, limit) {
                Ok(()) => break root,
                Err(e) if ram.is_some() && redo_on_disk(&e, ram_bound) => {
                    tracing::debug!(error = %e, "the RAM staging area is full; staging on disk");
                    ram = None;
                }
                Err(e) => return Err(e),
            }
        };
        // Mount points lohar uses, when the image has none.
        for (d, mode) in [
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("run", 0o755),
            ("tmp", 0o1777),
        ] {
            let p = root.join(d);
            if p.symlink_metadata().is_err() {
                std::fs::create_dir(&p).map_err(io("create directory", &p))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                    .map_err(io("chmod", &p))?;
            }
        }
        let unpacked = start.elapsed();
        let out = staging.path().join("out");
        std::fs::create_dir(&out).map_err(io("create directory", &out))?;
        let rootfs_bytes = pack_rootfs(&root, &out.join("rootfs.ext4"), OCI_LABEL)?;
        let packed = start.elapsed();
        let image = OciImage {
            name: name.to_owned(),
            source: source.to_owned(),
            digest: digest.to_owned(),
            architecture: config.architecture.clone(),
            config: config.config.clone().unwrap_or_default(),
            layers: layers.iter().map(|(d, _)| d.clone()).collect(),
            config_digest: config_digest.map(str::to_owned),
            rootfs_bytes,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let json = serde_json::to_vec_pretty(&image).map_err(|source| OciError::Json {
            what: "image.json".into(),
            error: source,
        })?;
        std::fs::write(out.join(IMAGE_JSON), json).map_err(io("write", &out))?;
        let inputs = Inputs {
            recipe: RECIPE,
            packages: vec![],
            other: BTreeMap::from([
                ("source".to_owned(), source.to_owned()),
                ("digest".to_owned(), digest.to_owned()),
            ]),
        };
        let manifest = Manifest::new(
            &format!("oci-{name}"),
            inputs,
            &out,
            &["rootfs.ext4", IMAGE_JSON],
            start.elapsed().as_millis() as u64,
        )?;
        manifest.save(&out.join(MANIFEST))?;
        let hashed = start.elapsed();
        replace_dir(&out, &self.image_dir(name))?;
        drop(ram);
        drop(staging);
        tracing::debug!(
            name,
            ?unpacked,
            ?packed,
            ?hashed,
            total = ?start.elapsed(),
            "built an OCI image (times since the start: layers applied, mkfs done, manifest hashed, staging removed)"
        );
        Ok(image)
    }

    /// Removes image `name`; `false` if there was none.
    pub fn remove(&self, name: &str) -> Result<bool, OciError> {
        validate_name(name)?;
        let dir = self.image_dir(name);
        if !dir.is_dir() {
            return Ok(false);
        }
        std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        Ok(true)
    }
}

/// Makes `root` and applies `layers` (bottom first) to it.
fn apply_layers(root: &Path, layers: &[(String, PathBuf)], budget: u64) -> Result<(), OciError> {
    std::fs::create_dir(root).map_err(io("create directory", root))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
        .map_err(io("chmod", root))?;
    let mut left = budget;
    for (digest, path) in layers {
        let f = std::fs::File::open(path).map_err(io("open", path))?;
        let reader = open_layer(f, path)?;
        let stats = apply_layer(root, reader, &format!("layer {digest}"), &mut left)?;
        tracing::debug!(%digest, ?stats, "applied layer");
    }
    Ok(())
}

/// The unpack budget of an attempt: the caller's, or in RAM what was
/// reserved when that is less (then `true`: running past it is no error of
/// the image's, the attempt is redone on disk).
fn unpack_limit(reserved: Option<u64>, budget: u64) -> (u64, bool) {
    match reserved {
        Some(r) if r < budget => (r, true),
        _ => (budget, false),
    }
}

/// Whether a RAM attempt that failed with `e` is redone on disk: it ran
/// out of room, or past its reservation (`ram_bound`).
fn redo_on_disk(e: &OciError, ram_bound: bool) -> bool {
    out_of_space(e) || (ram_bound && matches!(e, OciError::TooLarge { .. }))
}

/// Where RAM staging areas are made (a tmpfs on every Linux system).
const RAM_DIR: &str = "/dev/shm";
const RAM_PREFIX: &str = "bhatti-oci-build-";

/// A fresh private (0700, random name) directory in `/dev/shm` for the
/// tree of `layers`, if their unpacked size (from the gzip trailers; a
/// lie only makes the attempt fall back to disk) takes at most half of
/// both the room left there and the memory available. Areas left by
/// processes that are gone are removed first.
fn ram_staging(layers: &[(String, PathBuf)]) -> Option<RamStaging> {
    let ram = Path::new(RAM_DIR);
    remove_stale_ram_staging(ram);
    let mut estimate: u64 = 64 << 20;
    for (_, path) in layers {
        estimate = estimate.saturating_add(unpacked_estimate(path)?.saturating_mul(5) / 4);
    }
    let fs = nix::sys::statvfs::statvfs(ram).ok()?;
    let room = fs.blocks_available() as u64 * fs.fragment_size() as u64;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
        .saturating_mul(1024);
    // Builds in this process share the room (each counts what it expects).
    let reserved = RAM_RESERVED.fetch_add(estimate, Ordering::SeqCst);
    let mut area = RamStaging {
        dir: None,
        bytes: estimate,
    };
    let total = reserved.saturating_add(estimate);
    if total > room / 2 || total > available / 2 {
        return None;
    }
    area.dir = Some(
        tempfile::Builder::new()
            .prefix(&format!("{RAM_PREFIX}{}-", std::process::id()))
            .tempdir_in(ram)
            .ok()?,
    );
    Some(area)
}

/// Bytes of RAM staging the builds of this process expect to use.
static RAM_RESERVED: AtomicU64 = AtomicU64::new(0);

/// A RAM staging area, removed and its reservation returned on drop.
struct RamStaging {
    dir: Option<tempfile::TempDir>,
    bytes: u64,
}

impl RamStaging {
    fn path(&self) -> &Path {
        self.dir.as_ref().expect("made with a directory").path()
    }
}

impl Drop for RamStaging {
    fn drop(&mut self) {
        drop(self.dir.take());
        RAM_RESERVED.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// The unpacked size of a layer blob: a gzip member's trailer (its size
/// modulo 4 GiB; a blob over 4 GiB gives none), or a plain tar's length.
fn unpacked_estimate(path: &Path) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut magic = [0u8; 2];
    f.read_exact(&mut magic).ok()?;
    if magic != [0x1f, 0x8b] {
        return Some(len);
    }
    if !(20..1 << 32).contains(&len) {
        return None;
    }
    let mut trailer = [0u8; 4];
    f.seek(SeekFrom::End(-4)).ok()?;
    f.read_exact(&mut trailer).ok()?;
    Some(u64::from(u32::from_le_bytes(trailer)).max(len))
}

/// Removes RAM staging areas of this user whose process is gone (a crash).
fn remove_stale_ram_staging(ram: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(ram) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(RAM_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        if m.is_dir() && m.uid() == me && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Whether `e` is the file system running out of room.
fn out_of_space(e: &OciError) -> bool {
    let os = match e {
        OciError::Io { error, .. } => error.raw_os_error(),
        OciError::Tar { error, .. } => error.raw_os_error(),
        _ => None,
    };
    matches!(
        os,
        Some(libc::ENOSPC) | Some(libc::ENOMEM) | Some(libc::EDQUOT)
    )
}

/// Reads a whole file of at most `limit` bytes.
pub(crate) fn read_limited(path: &Path, what: &str, limit: u64) -> Result<Vec<u8>, OciError> {
    let m = std::fs::metadata(path).map_err(io("stat", path))?;
    if m.len() > limit {
        return Err(OciError::TooLarge {
            what: what.to_owned(),
            limit,
        });
    }
    std::fs::read(path).map_err(io("read", path))
}

/// A lock on the blob cache (`DATA/images/oci/blobs/.lock`, `flock`):
/// shared while blobs are written and read, exclusive to remove them.
/// Released when dropped (or when its process ends).
#[derive(Debug)]
pub struct BlobLock {
    _file: std::fs::File,
}

impl BlobLock {
    /// Takes it shared (waiting), or exclusive without waiting (`None`
    /// when another holds it).
    fn take(dir: &Path, exclusive: bool) -> Result<Option<BlobLock>, OciError> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
        let path = dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let op = if exclusive {
            libc::LOCK_EX | libc::LOCK_NB
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(Some(BlobLock { _file: file }));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if exclusive => return Ok(None),
                _ => return Err(io("lock", &path)(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_every_blob_no_image_names_and_waits_for_pulls() {
        let dir = tempfile::tempdir().unwrap();
        let images = OciImages::new(Layout::new(dir.path()));
        let hex = |c: char| c.to_string().repeat(64);
        let blobs = images.dir().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for name in [hex('a'), hex('b'), hex('c'), hex('d'), ".tmp-x-1".into()] {
            std::fs::write(blobs.join(name), b"12345").unwrap();
        }
        // An image whose layer is a and config b.
        let d = images.image_dir("app");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("rootfs.ext4"), b"x").unwrap();
        std::fs::write(d.join(MANIFEST), "{}").unwrap();
        let img = OciImage {
            name: "app".into(),
            source: "r/app:1".into(),
            digest: format!("sha256:{}", hex('e')),
            architecture: "amd64".into(),
            config: RunConfig::default(),
            layers: vec![format!("sha256:{}", hex('a'))],
            config_digest: Some(format!("sha256:{}", hex('b'))),
            rootfs_bytes: 1,
            created_unix: 0,
        };
        std::fs::write(d.join(IMAGE_JSON), serde_json::to_vec(&img).unwrap()).unwrap();
        // A pull holds the cache: nothing is removed.
        let pulling = images.use_blobs().unwrap();
        assert_eq!(images.collect_garbage().unwrap(), None);
        assert!(blobs.join(hex('c')).exists());
        drop(pulling);
        assert_eq!(images.collect_garbage().unwrap(), Some((3, 15)));
        let mut left: Vec<String> = std::fs::read_dir(&blobs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [hex('a'), hex('b')]);
        // Without the image, its blobs go too.
        assert!(images.remove("app").unwrap());
        assert_eq!(images.collect_garbage().unwrap(), Some((2, 10)));
    }

    #[test]
    fn unpacked_sizes_come_from_gzip_trailers() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![b'x'; 300_000];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &data).unwrap();
        let gz = gz.finish().unwrap();
        assert!(gz.len() < 10_000);
        let p = dir.path().join("l.tgz");
        std::fs::write(&p, &gz).unwrap();
        assert_eq!(unpacked_estimate(&p), Some(300_000));
        // A plain tar is its own size; a truncated gzip gives none.
        let t = dir.path().join("l.tar");
        std::fs::write(&t, &data[..5000]).unwrap();
        assert_eq!(unpacked_estimate(&t), Some(5000));
        std::fs::write(&p, &gz[..10]).unwrap();
        assert_eq!(unpacked_estimate(&p), None);
        // A trailer claiming less than the blob counts the blob.
        let mut lie = gz.clone();
        let n = lie.len();
        lie[n - 4..].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&p, &lie).unwrap();
        assert_eq!(unpacked_estimate(&p), Some(n as u64));
    }

    #[test]
    fn a_ram_attempt_stops_at_its_reservation_and_is_redone_on_disk() {
        // A lying trailer: far more content than reserved.
        let (limit, bound) = unpack_limit(Some(100 << 20), 16 << 30);
        assert_eq!((limit, bound), (100 << 20, true));
        let past = OciError::TooLarge {
            what: "unpacked layers".into(),
            limit,
        };
        assert!(redo_on_disk(&past, bound));
        // On disk (or a reservation above the budget) the budget is the
        // caller's and running past it is the image's error.
        assert_eq!(unpack_limit(None, 5 << 30), (5 << 30, false));
        assert_eq!(unpack_limit(Some(6 << 30), 5 << 30), (5 << 30, false));
        assert!(!redo_on_disk(&past, false));
    }

    #[test]
    fn only_running_out_of_room_retries_on_disk() {
        let full = OciError::Tar {
            what: "l".into(),
            error: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(out_of_space(&full));
        let other = OciError::Io {
            op: "create",
            path: "/x".into(),
            error: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert!(!out_of_space(&other));
        let hostile = OciError::UnsafeEntry {
            path: "../x".into(),
            reason: "the path contains '..'",
        };
        assert!(!out_of_space(&hostile));
    }

    #[test]
    fn ram_areas_are_reserved_and_returned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.tar");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let layers = vec![("sha256:x".to_owned(), p)];
        let before = RAM_RESERVED.load(Ordering::SeqCst);
        if let Some(area) = ram_staging(&layers) {
            assert!(area.path().is_dir());
            assert!(RAM_RESERVED.load(Ordering::SeqCst) >= before + 4096);
            let path = area.path().to_owned();
            drop(area);
            assert!(!path.exists());
        }
        // Other tests may hold areas meanwhile; none is left by this one.
        let layers_none = vec![("sha256:y".to_owned(), dir.path().join("missing"))];
        assert!(ram_staging(&layers_none).is_none());
    }

    #[test]
    fn stale_ram_areas_of_dead_processes_go() {
        let ram = tempfile::tempdir().unwrap();
        // A pid that cannot exist (above the kernel's maximum).
        let dead = ram.path().join(format!("{RAM_PREFIX}4294967-abc"));
        let live = ram
            .path()
            .join(format!("{RAM_PREFIX}{}-abc", std::process::id()));
        let other = ram.path().join("unrelated-4294967");
        for d in [&dead, &live, &other] {
            std::fs::create_dir(d).unwrap();
        }
        remove_stale_ram_staging(ram.path());
        assert!(!dead.exists() && live.exists() && other.exists());
    }
}
