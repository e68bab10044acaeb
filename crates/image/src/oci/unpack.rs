//! Applying image layers to a staging root, in order, with OCI whiteouts.
//!
//! Layers are hostile input. Every entry's path is checked before anything
//! is written: absolute paths, `..` components and paths whose parent
//! directories go through a symlink are refused with
//! [`OciError::UnsafeEntry`] (no symlink is ever followed while writing, so
//! nothing lands outside the root). Hard links must name a file inside the
//! root by the same rules. Ownership and modes (setuid included) are
//! preserved — the daemon runs as root; device nodes and extended
//! attributes are skipped. An unpacked-bytes budget bounds decompression
//! bombs.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use super::error::{io, OciError};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// What one layer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries written (files, directories, links).
    pub entries: u64,
    /// Whiteouts applied (opaque ones included).
    pub whiteouts: u64,
    /// Entries skipped (devices).
    pub skipped: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// Turns a tar entry path into a relative path of normal components, or
/// refuses it. `Ok(None)` is the root itself (`.`, `./`).
pub fn sanitize(raw: &Path) -> Result<Option<PathBuf>, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("the path contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("the path is absolute"),
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Checks that no existing ancestor of `rel` under `root` is anything but
/// a real directory (a symlink would redirect the write). Missing
/// ancestors are created as root-owned 0755 directories when `create`;
/// otherwise `Ok(false)` says one is missing.
fn prepare_parents(root: &Path, rel: &Path, shown: &str, create: bool) -> Result<bool, OciError> {
    let mut cur = root.to_path_buf();
    let parent = rel.parent().unwrap_or(Path::new(""));
    for c in parent.components() {
        cur.push(c);
        match cur.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(OciError::UnsafeEntry {
                    path: shown.to_owned(),
                    reason: "a parent directory is a symlink",
                })
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(OciError::UnsafeEntry {
                    path: shown.to_owned(),
                    reason: "a parent directory is not a directory",
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !create {
                    return Ok(false);
                }
                std::fs::create_dir(&cur).map_err(io("create directory", &cur))?;
                std::fs::set_permissions(&cur, std::fs::Permissions::from_mode(0o755))
                    .map_err(io("chmod", &cur))?;
            }
            Err(e) => return Err(io("stat", &cur)(e)),
        }
    }
    Ok(true)
}

/// What every entry costs against the unpacked budget besides its
/// content: an inode and a block, so a layer of millions of empty files is
/// bounded too.
pub const ENTRY_COST: u64 = 4096;

/// Removes whatever is at `path` (not following symlinks).
fn remove_any(path: &Path) -> Result<(), OciError> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map_err(io("remove", path)),
        Ok(_) => std::fs::remove_file(path).map_err(io("remove", path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("stat", path)(e)),
    }
}

/// Opens a layer blob, gunzipping it when it is gzip (by its magic). zstd
/// layers are refused.
pub fn open_layer(file: std::fs::File, path: &Path) -> Result<Box<dyn Read>, OciError> {
    let mut r = BufReader::new(file);
    let head = r.fill_buf().map_err(io("read", path))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(OciError::UnsupportedMediaType(
            "zstd-compressed layer (only plain and gzip tar layers are supported)".into(),
        ))
    } else {
        Ok(Box::new(r))
    }
}

/// Applies one layer (an uncompressed tar stream) to `root`. `budget` is
/// the number of content bytes still allowed; it is decreased.
pub fn apply_layer(
    root: &Path,
    layer: impl Read,
    what: &str,
    budget: &mut u64,
) -> Result<LayerStats, OciError> {
    let tar_err = |source| OciError::Tar {
        what: what.to_owned(),
        error: source,
    };
    let mut archive = tar::Archive::new(layer);
    let mut stats = LayerStats::default();
    // Paths this layer wrote: its own whiteouts do not remove them.
    let mut written: HashSet<PathBuf> = HashSet::new();
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let raw = entry.path().map_err(tar_err)?.into_owned();
        let shown = raw.to_string_lossy().into_owned();
        let unsafe_entry = |reason| OciError::UnsafeEntry {
            path: shown.clone(),
            reason,
        };
        let Some(rel) = sanitize(&raw).map_err(unsafe_entry)? else {
            continue; // the root itself
        };
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        *budget = budget.checked_sub(ENTRY_COST).ok_or(OciError::TooLarge {
            what: format!("{what} (unpacked)"),
            limit: *budget,
        })?;
        let whiteout = name.starts_with(WHITEOUT_PREFIX);
        if whiteout && name != OPAQUE && matches!(&name[WHITEOUT_PREFIX.len()..], "" | "." | "..") {
            return Err(unsafe_entry("malformed whiteout"));
        }
        // A whiteout under a directory that does not exist has nothing to
        // hide (and creates nothing).
        if !prepare_parents(root, &rel, &shown, !whiteout)? {
            stats.whiteouts += 1;
            continue;
        }
        let dest = root.join(&rel);

        // Whiteouts.
        if name == OPAQUE {
            let dir = dest.parent().unwrap_or(root).to_path_buf();
            let rel_dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            if dir.is_dir() {
                for child in std::fs::read_dir(&dir).map_err(io("read directory", &dir))? {
                    let child = child.map_err(io("read directory", &dir))?;
                    if !written.contains(&rel_dir.join(child.file_name())) {
                        remove_any(&child.path())?;
                    }
                }
            }
            stats.whiteouts += 1;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(unsafe_entry("malformed whiteout"));
            }
            let target_rel = rel.with_file_name(hidden);
            if !written.contains(&target_rel) {
                remove_any(&root.join(&target_rel))?;
            }
            stats.whiteouts += 1;
            continue;
        }

        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(tar_err)? & 0o7777;
        let uid = header.uid().map_err(tar_err)?;
        let gid = header.gid().map_err(tar_err)?;
        let (uid, gid) = (
            u32::try_from(uid).map_err(|_| unsafe_entry("uid out of range"))?,
            u32::try_from(gid).map_err(|_| unsafe_entry("gid out of range"))?,
        );
        let mtime = header.mtime().unwrap_or(0);

        // Whatever is there goes, except a directory replaced by a directory.
        let existing = dest.symlink_metadata().ok();
        let keep_dir = kind.is_dir() && existing.as_ref().is_some_and(|m| m.is_dir());
        if existing.is_some() && !keep_dir {
            remove_any(&dest)?;
        }
        match kind {
            tar::EntryType::Directory => {
                if !keep_dir {
                    std::fs::create_dir(&dest).map_err(io("create directory", &dest))?;
                }
                std::os::unix::fs::lchown(&dest, Some(uid), Some(gid))
                    .map_err(io("chown", &dest))?;
                // Modes last (a 0500 directory must still take its
                // children); see the loop's end.
                dirs.push((dest.clone(), mode));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                if size > *budget {
                    return Err(OciError::TooLarge {
                        what: format!("{what} (unpacked)"),
                        limit: *budget,
                    });
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dest)
                    .map_err(io("create", &dest))?;
                let n = std::io::copy(&mut (&mut entry).take(size), &mut f).map_err(tar_err)?;
                *budget -= n;
                stats.bytes += n;
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io("chown", &dest))?;
                // After chown: chown clears setuid/setgid.
                f.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(io("chmod", &dest))?;
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                let _ = f.set_modified(t);
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(tar_err)?
                    .ok_or_else(|| unsafe_entry("symlink without a target"))?;
                // The target is data; it is never followed here.
                std::os::unix::fs::symlink(&target, &dest).map_err(io("symlink", &dest))?;
                std::os::unix::fs::lchown(&dest, Some(uid), Some(gid))
                    .map_err(io("chown", &dest))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(tar_err)?
                    .ok_or_else(|| unsafe_entry("hard link without a target"))?;
                let target_rel = sanitize(&target)
                    .map_err(|_| unsafe_entry("hard link target is absolute or contains '..'"))?
                    .ok_or_else(|| unsafe_entry("hard link to the root"))?;
                let shown_target = target.to_string_lossy().into_owned();
                // Its directories must be real ones (no symlink detour);
                // nothing is created for it.
                let mut cur = root.to_path_buf();
                for c in target_rel.parent().unwrap_or(Path::new("")).components() {
                    cur.push(c);
                    match cur.symlink_metadata() {
                        Ok(m) if m.is_dir() => {}
                        _ => {
                            return Err(OciError::UnsafeEntry {
                                path: shown_target,
                                reason: "hard link target's directory is missing or a symlink",
                            })
                        }
                    }
                }
                let src = root.join(&target_rel);
                match src.symlink_metadata() {
                    Ok(m) if !m.is_dir() => {}
                    _ => return Err(unsafe_entry("hard link target is missing or a directory")),
                }
                // linkat without AT_SYMLINK_FOLLOW: a symlink is linked, not
                // followed.
                std::fs::hard_link(&src, &dest).map_err(io("link", &dest))?;
            }
            tar::EntryType::Fifo => {
                nix::unistd::mkfifo(&dest, nix::sys::stat::Mode::from_bits_truncate(mode))
                    .map_err(|e| io("mkfifo", &dest)(e.into()))?;
                std::os::unix::fs::lchown(&dest, Some(uid), Some(gid))
                    .map_err(io("chown", &dest))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                tracing::debug!(path = %shown, "skipping a device node in a layer");
                stats.skipped += 1;
                continue;
            }
            // PAX/GNU headers are consumed by the tar reader; anything
            // else is not a file.
            _ => {
                stats.skipped += 1;
                continue;
            }
        }
        written.insert(rel);
        stats.entries += 1;
    }
    // Deepest first, so a read-only parent is set after its children.
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (d, mode) in dirs {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
            .map_err(io("chmod", &d))?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// One tar entry; names are written raw (the tar crate's builder
    /// refuses `..`, a hostile layer does not).
    enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, &'a [u8], u32, u64),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
    }

    fn layer(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_old();
            let (name, kind, data, mode, uid, link): (&str, _, &[u8], u32, u64, Option<&str>) =
                match e {
                    E::Dir(n, m) => (n, tar::EntryType::Directory, b"", *m, 0, None),
                    E::File(n, d, m, u) => (n, tar::EntryType::Regular, d, *m, *u, None),
                    E::Sym(n, t) => (n, tar::EntryType::Symlink, b"", 0o777, 0, Some(t)),
                    E::Hard(n, t) => (n, tar::EntryType::Link, b"", 0o644, 0, Some(t)),
                };
            let raw = &mut h.as_old_mut().name;
            raw.fill(0);
            raw[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(t) = link {
                let l = &mut h.as_old_mut().linkname;
                l.fill(0);
                l[..t.len()].copy_from_slice(t.as_bytes());
            }
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        // root is two levels deep so `../..` lands in the fixture.
        let root = dir.path().join("a/root");
        std::fs::create_dir_all(&root).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("canary"), b"untouched").unwrap();
        Fixture {
            _dir: dir,
            root,
            outside,
        }
    }

    impl Fixture {
        fn apply(&self, entries: &[E]) -> Result<LayerStats, OciError> {
            let mut budget = 1 << 20;
            apply_layer(&self.root, &layer(entries)[..], "test layer", &mut budget)
        }

        /// Nothing outside the root changed: `outside` holds only the
        /// canary, intact, and the root's parents hold only the root.
        fn outside_untouched(&self) {
            let names: Vec<_> = std::fs::read_dir(&self.outside)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![std::ffi::OsString::from("canary")]);
            assert_eq!(
                std::fs::read(self.outside.join("canary")).unwrap(),
                b"untouched"
            );
            let a: Vec<_> = std::fs::read_dir(self.root.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(a, vec![std::ffi::OsString::from("root")]);
            let top: Vec<_> = std::fs::read_dir(self.root.parent().unwrap().parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            assert_eq!(top, vec!["a".to_string(), "outside".to_string()]);
        }
    }

    fn refused(r: Result<LayerStats, OciError>) -> String {
        match r {
            Err(OciError::UnsafeEntry { path, reason }) => format!("{path}: {reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn sanitize_paths() {
        assert_eq!(sanitize(Path::new("./a/b")), Ok(Some(PathBuf::from("a/b"))));
        assert_eq!(
            sanitize(Path::new("a//b/./")),
            Ok(Some(PathBuf::from("a/b")))
        );
        assert_eq!(sanitize(Path::new(".")), Ok(None));
        assert!(sanitize(Path::new("/etc/passwd")).is_err());
        assert!(sanitize(Path::new("a/../b")).is_err());
        assert!(sanitize(Path::new("..")).is_err());
    }

    #[test]
    fn files_modes_owners_links() {
        let f = fixture();
        let stats = f
            .apply(&[
                E::Dir("./", 0o755),
                E::Dir("etc/", 0o755),
                E::File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644, 0),
                E::File("usr/bin/su", b"ELF", 0o4755, 0),
                E::Dir("home/u/", 0o700),
                E::File("home/u/f", b"x", 0o600, 1234),
                E::Sym("bin", "usr/bin"),
                E::Sym("abs", "/etc/passwd"),
                E::Hard("etc/passwd-link", "etc/passwd"),
            ])
            .unwrap();
        assert_eq!(stats.entries, 8);
        let r = &f.root;
        assert_eq!(
            std::fs::read(r.join("etc/passwd-link")).unwrap(),
            b"root:x:0:0::/root:/bin/sh\n"
        );
        let su = std::fs::metadata(r.join("usr/bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(su.mtime(), 1_700_000_000);
        let h = std::fs::metadata(r.join("home/u/f")).unwrap();
        assert_eq!((h.uid(), h.gid(), h.mode() & 0o777), (1234, 1234, 0o600));
        assert_eq!(
            std::fs::metadata(r.join("home/u")).unwrap().mode() & 0o777,
            0o700
        );
        assert_eq!(
            std::fs::read_link(r.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert_eq!(
            std::fs::read_link(r.join("abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            std::fs::metadata(r.join("etc/passwd")).unwrap().ino(),
            std::fs::metadata(r.join("etc/passwd-link")).unwrap().ino()
        );
        f.outside_untouched();
    }

    #[test]
    fn whiteouts_and_replacements() {
        let f = fixture();
        f.apply(&[
            E::File("a/keep", b"1", 0o644, 0),
            E::File("a/gone", b"1", 0o644, 0),
            E::File("o/old1", b"1", 0o644, 0),
            E::Dir("o/old2/", 0o755),
            E::File("o/old2/deep", b"1", 0o644, 0),
            E::File("d", b"file", 0o644, 0),
            E::Dir("x/", 0o755),
            E::File("x/y", b"1", 0o644, 0),
            E::Dir("kept/", 0o700),
        ])
        .unwrap();
        let stats = f
            .apply(&[
                E::File("a/.wh.gone", b"", 0o644, 0),
                // The layer's own new file survives its opaque marker,
                // wherever the marker comes.
                E::File("o/new", b"2", 0o644, 0),
                E::File("o/.wh..wh..opq", b"", 0o644, 0),
                E::Dir("d/", 0o755),
                E::File("x", b"now a file", 0o644, 0),
                E::Dir("kept/", 0o750),
                E::File("a/.wh.never-existed", b"", 0o644, 0),
            ])
            .unwrap();
        assert_eq!(stats.whiteouts, 3);
        let r = &f.root;
        assert!(r.join("a/keep").is_file());
        assert!(r.join("a/gone").symlink_metadata().is_err());
        let o: Vec<_> = std::fs::read_dir(r.join("o"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(o, vec!["new"]);
        assert!(r.join("d").is_dir());
        assert_eq!(std::fs::read(r.join("x")).unwrap(), b"now a file");
        assert_eq!(
            std::fs::metadata(r.join("kept")).unwrap().mode() & 0o777,
            0o750
        );
        // No whiteout file itself lands in the tree.
        assert!(r.join("a/.wh.gone").symlink_metadata().is_err());
        assert!(r.join("o/.wh..wh..opq").symlink_metadata().is_err());
        f.outside_untouched();
    }

    #[test]
    fn hostile_paths_are_refused() {
        let cases: &[&[E]] = &[
            &[E::File("../escape", b"x", 0o644, 0)],
            &[E::File("../../outside/canary", b"pwned", 0o644, 0)],
            &[E::File("a/../../../outside/x", b"x", 0o644, 0)],
            &[E::File("/etc/bhatti-test-abs", b"x", 0o644, 0)],
            &[E::Dir("/tmp/", 0o777)],
            &[E::Dir("../up/", 0o755)],
            &[E::Sym("../link", "/")],
            &[E::Hard("h", "../../outside/canary")],
            &[E::Hard("h", "/etc/passwd")],
            &[E::File("../.wh.root", b"", 0o644, 0)],
            &[E::File("../../.wh.outside", b"", 0o644, 0)],
            &[E::File("../.wh..wh..opq", b"", 0o644, 0)],
            &[E::File("x/.wh...", b"", 0o644, 0)],
        ];
        for (i, entries) in cases.iter().enumerate() {
            let f = fixture();
            let why = refused(f.apply(entries));
            eprintln!("case {i}: {why}");
            f.outside_untouched();
            assert!(!Path::new("/etc/bhatti-test-abs").exists());
        }
    }

    /// Each: a symlink planted (first layer), then an entry through it.
    fn symlink_cases(out: &str) -> Vec<(Vec<E<'_>>, Vec<E<'_>>)> {
        vec![
            // Absolute symlink to a host directory, a file through it.
            (
                vec![E::Sym("l", out)],
                vec![E::File("l/pwned", b"x", 0o644, 0)],
            ),
            // Relative symlink climbing out.
            (
                vec![E::Sym("l", "../../outside")],
                vec![E::File("l/pwned", b"x", 0o644, 0)],
            ),
            // Deeper: a real dir, then a symlink inside it.
            (
                vec![E::Dir("d/", 0o755), E::Sym("d/l", "../../../outside")],
                vec![E::File("d/l/sub/pwned", b"x", 0o644, 0)],
            ),
            // A directory entry through it.
            (vec![E::Sym("l", out)], vec![E::Dir("l/newdir/", 0o755)]),
            // A symlink entry through it.
            (vec![E::Sym("l", out)], vec![E::Sym("l/s", "/")]),
            // Whiteouts through it would delete host files.
            (
                vec![E::Sym("l", out)],
                vec![E::File("l/.wh.canary", b"", 0o644, 0)],
            ),
            (
                vec![E::Sym("l", out)],
                vec![E::File("l/.wh..wh..opq", b"", 0o644, 0)],
            ),
            // A hard link whose target goes through it.
            (vec![E::Sym("l", out)], vec![E::Hard("h", "l/canary")]),
            // Even inside the root: a symlinked parent is refused.
            (
                vec![E::Dir("real/", 0o755), E::Sym("l", "real")],
                vec![E::File("l/x", b"x", 0o644, 0)],
            ),
            // Same layer: plant and use at once.
            (
                vec![],
                vec![E::Sym("l", out), E::File("l/pwned", b"x", 0o644, 0)],
            ),
        ]
    }

    #[test]
    fn nothing_goes_through_a_symlink() {
        let n = symlink_cases("/").len();
        for i in 0..n {
            let f = fixture();
            let out = f.outside.to_str().unwrap().to_owned();
            let (first, second) = symlink_cases(&out).swap_remove(i);
            f.apply(&first).unwrap();
            let why = refused(f.apply(&second));
            eprintln!("case {i}: {why}");
            f.outside_untouched();
        }
    }

    #[test]
    fn a_symlink_is_replaced_not_followed() {
        let f = fixture();
        let target = f.outside.join("canary");
        let t: &'static str = Box::leak(target.to_str().unwrap().to_owned().into_boxed_str());
        f.apply(&[E::Sym("l", t)]).unwrap();
        // A file, a dir, a hard link named like the symlink replace it.
        f.apply(&[E::File("l", b"inside", 0o644, 0)]).unwrap();
        assert_eq!(std::fs::read(f.root.join("l")).unwrap(), b"inside");
        f.apply(&[E::Sym("m", t), E::Dir("m/", 0o755)]).unwrap();
        assert!(f.root.join("m").symlink_metadata().unwrap().is_dir());
        // A hard link to a symlink links the symlink itself.
        f.apply(&[E::Sym("s", t), E::Hard("h", "s")]).unwrap();
        assert!(f
            .root
            .join("h")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink());
        f.outside_untouched();
    }

    #[test]
    fn budget_bounds_content() {
        let f = fixture();
        let big = vec![7u8; 4096];
        let mut budget = 5000 + ENTRY_COST;
        apply_layer(
            &f.root,
            &layer(&[E::File("a", &big, 0o644, 0)])[..],
            "l",
            &mut budget,
        )
        .unwrap();
        assert_eq!(budget, 5000 - 4096);
        let err = apply_layer(
            &f.root,
            &layer(&[E::File("b", &big, 0o644, 0)])[..],
            "l",
            &mut budget,
        )
        .unwrap_err();
        assert!(matches!(err, OciError::TooLarge { .. }), "{err}");
        assert!(f.root.join("b").symlink_metadata().is_err());
        // Many empty entries exhaust it too.
        let many: Vec<String> = (0..100).map(|i| format!("e{i}")).collect();
        let entries: Vec<E> = many.iter().map(|n| E::File(n, b"", 0o644, 0)).collect();
        let mut budget = 50 * ENTRY_COST;
        let err = apply_layer(&f.root, &layer(&entries)[..], "l", &mut budget).unwrap_err();
        assert!(matches!(err, OciError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn gnu_sparse_files_unpack_whole() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let f = std::fs::File::create(src.join("sparse")).unwrap();
        f.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, b"end", (1 << 20) - 3).unwrap();
        drop(f);
        let tar = dir.path().join("l.tar");
        let ok = std::process::Command::new("tar")
            .args(["--sparse", "--format=gnu", "-C"])
            .arg(&src)
            .arg("-cf")
            .arg(&tar)
            .arg("sparse")
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let mut budget = 4 << 20;
        let stats =
            apply_layer(&root, std::fs::File::open(&tar).unwrap(), "s", &mut budget).unwrap();
        assert_eq!(stats.entries, 1);
        let back = std::fs::read(root.join("sparse")).unwrap();
        assert_eq!(back.len(), 1 << 20);
        assert!(back.ends_with(b"end") && back[..1000].iter().all(|b| *b == 0));
    }

    #[test]
    fn a_whiteout_in_a_missing_directory_creates_nothing() {
        let f = fixture();
        let stats = f
            .apply(&[
                E::File("no/such/.wh.x", b"", 0o644, 0),
                E::File("gone/.wh..wh..opq", b"", 0o644, 0),
            ])
            .unwrap();
        assert_eq!(stats.whiteouts, 2);
        assert_eq!(std::fs::read_dir(&f.root).unwrap().count(), 0);
    }

    #[test]
    fn gzip_layers_open_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let tar = layer(&[E::File("f", b"gz", 0o644, 0)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let p = dir.path().join("l.tgz");
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let r = open_layer(std::fs::File::open(&p).unwrap(), &p).unwrap();
        let mut budget = 1 << 20;
        apply_layer(&root, r, "gz", &mut budget).unwrap();
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"gz");
        let zst = dir.path().join("l.zst");
        std::fs::write(&zst, [0x28, 0xb5, 0x2f, 0xfd, 0, 0]).unwrap();
        assert!(matches!(
            open_layer(std::fs::File::open(&zst).unwrap(), &zst),
            Err(OciError::UnsupportedMediaType(_))
        ));
        let err = apply_layer(&root, &[1u8; 1000][..], "junk", &mut budget).unwrap_err();
        assert!(matches!(err, OciError::Tar { .. }), "{err}");
    }
}
