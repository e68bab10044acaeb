//! The content-addressed blob cache: `DATA/images/oci/blobs/sha256/<hex>`.
//! A blob enters it only after its bytes hashed to its digest within the
//! size budget (written to a temporary file, then renamed), so a blob
//! present with its recorded size is never fetched again.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::{io, OciError};
use super::reference::valid_digest;

/// The blob cache.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    /// A cache rooted at `dir` (`…/blobs`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Where the blob `digest` lives (whether or not it is there).
    pub fn path(&self, digest: &str) -> Result<PathBuf, OciError> {
        if !valid_digest(digest) {
            return Err(OciError::BadDigest(digest.to_owned()));
        }
        Ok(self.dir.join("sha256").join(&digest["sha256:".len()..]))
    }

    /// The cached blob, if present with `size` bytes (any size if `None`).
    pub fn get(&self, digest: &str, size: Option<u64>) -> Result<Option<PathBuf>, OciError> {
        let p = self.path(digest)?;
        Ok(match p.metadata() {
            Ok(m) if m.is_file() && size.is_none_or(|s| m.len() == s) => Some(p),
            _ => None,
        })
    }

    /// Starts writing blob `digest`, at most `limit` bytes.
    pub fn writer(&self, digest: &str, what: &str, limit: u64) -> Result<BlobWriter, OciError> {
        let dest = self.path(digest)?;
        let dir = dest.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            &digest["sha256:".len()..],
            std::process::id()
        ));
        let file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            dest,
            digest: digest.to_owned(),
            what: what.to_owned(),
            hasher: Sha256::new(),
            written: 0,
            limit,
        })
    }

    /// Stores `bytes` as blob `digest` (verified).
    pub fn put(
        &self,
        digest: &str,
        what: &str,
        bytes: &[u8],
        limit: u64,
    ) -> Result<PathBuf, OciError> {
        let mut w = self.writer(digest, what, limit)?;
        w.write(bytes)?;
        w.finish()
    }

    /// Stores whatever `reader` yields under the digest it hashes to,
    /// returning the digest and size.
    pub fn put_any(
        &self,
        what: &str,
        reader: &mut dyn std::io::Read,
        limit: u64,
    ) -> Result<(String, u64), OciError> {
        let dir = self.dir.join("sha256");
        std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let tmp = dir.join(format!(".tmp-any-{}", std::process::id()));
        let result = (|| {
            let mut file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = reader.read(&mut buf).map_err(|source| OciError::Tar {
                    what: what.to_owned(),
                    error: source,
                })?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                if size > limit {
                    return Err(OciError::TooLarge {
                        what: what.to_owned(),
                        limit,
                    });
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).map_err(io("write", &tmp))?;
            }
            file.sync_all().map_err(io("sync", &tmp))?;
            let digest = format!("sha256:{}", crate::manifest::hex(&hasher.finalize()));
            let dest = self.path(&digest)?;
            std::fs::rename(&tmp, &dest).map_err(io("rename", &tmp))?;
            Ok((digest, size))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Copies `reader` into blob `digest` (verified).
    pub fn put_reader(
        &self,
        digest: &str,
        what: &str,
        reader: &mut dyn std::io::Read,
        limit: u64,
    ) -> Result<PathBuf, OciError> {
        let mut w = self.writer(digest, what, limit)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf).map_err(|source| OciError::Tar {
                what: what.to_owned(),
                error: source,
            })?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        w.finish()
    }
}

/// A blob being written: hashed and counted as it goes; removed unless
/// [`BlobWriter::finish`] verifies it.
#[derive(Debug)]
pub struct BlobWriter {
    file: Option<std::fs::File>,
    tmp: PathBuf,
    dest: PathBuf,
    digest: String,
    what: String,
    hasher: Sha256,
    written: u64,
    limit: u64,
}

impl BlobWriter {
    /// Appends a chunk; fails once more than the limit has come.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), OciError> {
        self.written += chunk.len() as u64;
        if self.written > self.limit {
            return Err(OciError::TooLarge {
                what: self.what.clone(),
                limit: self.limit,
            });
        }
        self.hasher.update(chunk);
        let f = self.file.as_mut().expect("open until finish");
        f.write_all(chunk).map_err(io("write", &self.tmp))
    }

    /// Bytes so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies the digest and moves the blob into place.
    pub fn finish(mut self) -> Result<PathBuf, OciError> {
        let actual = format!(
            "sha256:{}",
            crate::manifest::hex(&self.hasher.clone().finalize())
        );
        if actual != self.digest {
            return Err(OciError::DigestMismatch {
                what: self.what.clone(),
                expected: self.digest.clone(),
                actual,
            });
        }
        let f = self.file.take().expect("open until finish");
        f.sync_all().map_err(io("sync", &self.tmp))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.dest).map_err(io("rename", &self.tmp))?;
        Ok(self.dest.clone())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() || self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", crate::manifest::hex(&Sha256::digest(bytes)))
}

/// `sha256:<hex>` of a file.
pub fn digest_of_file(path: &Path) -> Result<String, OciError> {
    crate::manifest::sha256_file(path)
        .map(|(_, h)| format!("sha256:{h}"))
        .map_err(OciError::from)
}
