//! Per-artifact JSON manifests: what a build consumed (package versions,
//! input hashes, recipe version) and what it produced (file sizes and
//! SHA-256). A build is skipped when the stored manifest's inputs equal the
//! new ones and its files are still there with their recorded sizes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::apt::PackageRef;
use crate::error::{io, Error, Result};

/// A file an artifact consists of.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecord {
    /// Path relative to the directory holding the manifest.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// What a build step consumed; equal inputs mean the artifact is current.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inputs {
    /// Version of the build recipe (bumped when this crate changes how the
    /// artifact is made).
    pub recipe: u32,
    /// Debian packages the artifact was made from.
    pub packages: Vec<PackageRef>,
    /// Other inputs: hashes of input files, option values.
    pub other: BTreeMap<String, String>,
}

/// The manifest stored beside an artifact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Artifact name (`kernel`, `initramfs`, `rootfs-tiny`, …).
    pub artifact: String,
    /// What the build consumed.
    pub inputs: Inputs,
    /// What it produced.
    pub files: Vec<FileRecord>,
    /// When it was built (seconds since the Unix epoch).
    pub built_at_unix: u64,
    /// How long the build took.
    pub build_millis: u64,
}

impl Manifest {
    /// Describes `files` (relative to `dir`), hashing each.
    pub fn new(
        artifact: &str,
        inputs: Inputs,
        dir: &Path,
        files: &[&str],
        build_millis: u64,
    ) -> Result<Self> {
        let files = files
            .iter()
            .map(|name| {
                let path = dir.join(name);
                let (size, sha256) = sha256_file(&path)?;
                Ok(FileRecord {
                    name: (*name).to_owned(),
                    size,
                    sha256,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let built_at_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Self {
            artifact: artifact.to_owned(),
            inputs,
            files,
            built_at_unix,
            build_millis,
        })
    }

    /// Reads a manifest; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", path)(e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| Error::Manifest {
                path: path.to_owned(),
                source,
            })
    }

    /// Writes the manifest atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|source| Error::Manifest {
            path: path.to_owned(),
            source,
        })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("rename", &tmp))
    }

    /// Whether this manifest describes a current build for `inputs`: same
    /// inputs, every file present in `dir` with its recorded size.
    pub fn is_current(&self, inputs: &Inputs, dir: &Path) -> bool {
        self.inputs == *inputs
            && self.files.iter().all(|f| {
                std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.is_file() && m.len() == f.size)
            })
    }
}

/// Size and lowercase hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut file = std::fs::File::open(path).map_err(io("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&hasher.finalize())))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(v: &str) -> Inputs {
        Inputs {
            recipe: 1,
            packages: vec![PackageRef {
                name: "busybox-static".into(),
                version: v.into(),
                arch: None,
            }],
            other: BTreeMap::from([("k".to_string(), "v".to_string())]),
        }
    }

    #[test]
    fn sha256_of_known_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let (size, sum) = sha256_file(&p).unwrap();
        assert_eq!(size, 3);
        assert_eq!(
            sum,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn current_only_with_same_inputs_and_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rootfs.ext4"), b"0123").unwrap();
        let m = Manifest::new("rootfs-tiny", inputs("1"), dir.path(), &["rootfs.ext4"], 5).unwrap();
        let path = dir.path().join("manifest.json");
        m.save(&path).unwrap();
        let loaded = Manifest::load(&path).unwrap().unwrap();
        assert_eq!(loaded, m);
        assert!(loaded.is_current(&inputs("1"), dir.path()));
        assert!(!loaded.is_current(&inputs("2"), dir.path()));
        std::fs::write(dir.path().join("rootfs.ext4"), b"01234").unwrap();
        assert!(!loaded.is_current(&inputs("1"), dir.path()));
        assert_eq!(Manifest::load(&dir.path().join("none.json")).unwrap(), None);
        std::fs::write(&path, b"{\"artifact\":1}").unwrap();
        assert!(matches!(Manifest::load(&path), Err(Error::Manifest { .. })));
    }
}
