//! `import`: a `docker save` archive (docker-archive) or an OCI image
//! layout, as a tar file. Every regular file of the archive enters the
//! blob cache under the digest it hashes to; the archive's index or
//! manifest then names blobs by digest (an OCI layout's lying blob name
//! finds nothing) or by path (docker-archive).

use std::collections::HashMap;
use std::path::Path;

use super::blobs::BlobStore;
use super::error::{io, OciError};
use super::images::Origin;
use super::images::{read_limited, OciImage, OciImages};
use super::spec::{DockerArchiveEntry, ImageConfigBlob, Kind, ManifestOrIndex, LAYER_TYPES};
use super::unpack::sanitize;

/// Limits of an import or pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes downloaded or read from the archive, in all.
    pub download_bytes: u64,
    /// Most bytes of unpacked file content.
    pub unpacked_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            download_bytes: 8 << 30,
            unpacked_bytes: 16 << 30,
        }
    }
}

/// Manifests, indexes and configs are small.
pub(crate) const JSON_LIMIT: u64 = 4 << 20;

fn images_arch(images: &OciImages) -> &'static str {
    images.arch().name()
}

/// Imports the archive at `path` as image `name`.
pub fn import_archive(
    images: &OciImages,
    path: &Path,
    name: &str,
    limits: Limits,
) -> Result<OciImage, OciError> {
    super::images::validate_name(name)?;
    let _in_use = images.use_blobs()?;
    let bad = |reason: String| OciError::BadArchive {
        path: path.to_owned(),
        reason,
    };
    let blobs = images.blobs();
    let file = std::fs::File::open(path).map_err(io("open", path))?;
    let reader = super::unpack::open_layer(file, path)?;
    let mut archive = tar::Archive::new(reader);
    let what = path.display().to_string();
    let tar_err = |source| OciError::Tar {
        what: what.clone(),
        error: source,
    };
    // Archive path -> digest of its content; symlinks (older `docker save`
    // links a repeated layer to its first copy) -> the path they name.
    let mut files: HashMap<String, String> = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();
    let mut left = limits.download_bytes;
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let kind = entry.header().entry_type();
        if kind.is_symlink() {
            let raw = entry.path().map_err(tar_err)?.into_owned();
            let target = entry.link_name().map_err(tar_err)?;
            if let (Ok(Some(rel)), Some(t)) = (sanitize(&raw), target) {
                if let Some(to) = resolve_link(&rel, &t) {
                    links.insert(rel.to_string_lossy().into_owned(), to);
                }
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let raw = entry.path().map_err(tar_err)?.into_owned();
        let Ok(Some(rel)) = sanitize(&raw) else {
            return Err(bad(format!("entry '{}' has an unsafe path", raw.display())));
        };
        let (digest, size) = blobs.put_any(&what, &mut entry, left)?;
        left -= size;
        files.insert(rel.to_string_lossy().into_owned(), digest);
    }
    let source = format!("import:{}", path.display());
    if let Some(d) = files.get("manifest.json") {
        // docker-archive (newer `docker save` writes an OCI layout too; the
        // docker manifest is simpler to follow).
        let text = read_limited(&blobs.path(d)?, "manifest.json", JSON_LIMIT)?;
        let entries: Vec<DockerArchiveEntry> =
            serde_json::from_slice(&text).map_err(|source| OciError::Json {
                what: "docker-archive manifest.json".into(),
                error: source,
            })?;
        let [entry] = entries.as_slice() else {
            return Err(bad(format!(
                "manifest.json lists {} images; import takes archives of one",
                entries.len()
            )));
        };
        let lookup = |p: &str| {
            let mut key = sanitize(Path::new(p))
                .ok()
                .flatten()
                .map(|k| k.to_string_lossy().into_owned());
            for _ in 0..8 {
                match key.as_ref().and_then(|k| links.get(k)) {
                    Some(to) => key = Some(to.clone()),
                    None => break,
                }
            }
            key.and_then(|k| files.get(&k).cloned()).ok_or_else(|| {
                bad(format!(
                    "manifest.json names '{p}', which is not in the archive"
                ))
            })
        };
        let config_digest = lookup(&entry.config)?;
        let config = load_config(&blobs, &config_digest)?;
        let layers = entry
            .layers
            .iter()
            .map(|l| {
                let d = lookup(l)?;
                let p = blobs.path(&d)?;
                Ok((d, p))
            })
            .collect::<Result<Vec<_>, OciError>>()?;
        check_arch(images, &config, &source)?;
        return images.build(
            name,
            Origin {
                source: &source,
                digest: &config_digest,
                config_digest: Some(&config_digest),
            },
            &config,
            &layers,
            limits.unpacked_bytes,
        );
    }
    if files.contains_key("oci-layout") {
        let d = files
            .get("index.json")
            .ok_or_else(|| bad("an OCI layout without index.json".into()))?;
        let text = read_limited(&blobs.path(d)?, "index.json", JSON_LIMIT)?;
        let (mut doc, _) = ManifestOrIndex::parse(&text, Some(super::spec::OCI_INDEX))?;
        let arch = images_arch(images);
        // index.json -> (nested indexes) -> an image manifest.
        for _ in 0..4 {
            let desc = if doc.manifests.len() == 1 {
                doc.manifests[0].clone()
            } else {
                doc.pick(arch, &source)?.clone()
            };
            let p = blobs
                .get(&desc.digest, Some(desc.size))?
                .ok_or_else(|| bad(format!("blob {} is not in the archive", desc.digest)))?;
            let text = read_limited(&p, "manifest", JSON_LIMIT)?;
            let mt = (!desc.media_type.is_empty()).then_some(desc.media_type.as_str());
            let (next, kind) = ManifestOrIndex::parse(&text, mt)?;
            if kind == Kind::Index {
                doc = next;
                continue;
            }
            return build_from_manifest(
                images,
                name,
                &source,
                &desc.digest,
                &next,
                limits,
                |d, size| {
                    blobs
                        .get(d, Some(size))?
                        .ok_or_else(|| bad(format!("blob {d} is not in the archive")))
                },
            );
        }
        return Err(bad("indexes nested too deep".into()));
    }
    Err(bad(
        "no manifest.json (docker-archive) nor oci-layout (OCI layout) at its top".into(),
    ))
}

/// The archive path a symlink at `at` pointing to `target` names, if it
/// stays inside the archive.
fn resolve_link(at: &Path, target: &Path) -> Option<String> {
    use std::path::Component;
    let mut parts: Vec<String> = if target.is_absolute() {
        vec![]
    } else {
        at.parent()?
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect()
    };
    for c in target.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop()?;
            }
            _ => {}
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

pub(crate) fn load_config(blobs: &BlobStore, digest: &str) -> Result<ImageConfigBlob, OciError> {
    let p = blobs.path(digest)?;
    let text = read_limited(&p, "image config", JSON_LIMIT)?;
    serde_json::from_slice(&text).map_err(|source| OciError::Json {
        what: "image config".into(),
        error: source,
    })
}

/// Refuses an image of another architecture (its binaries would not run).
pub(crate) fn check_arch(
    images: &OciImages,
    config: &ImageConfigBlob,
    source: &str,
) -> Result<(), OciError> {
    let arch = images_arch(images);
    if !config.architecture.is_empty() && config.architecture != arch {
        return Err(OciError::NoPlatform {
            arch: arch.to_owned(),
            reference: source.to_owned(),
            available: format!("{}/{}", config.os, config.architecture),
        });
    }
    Ok(())
}

/// Builds `name` from an image manifest whose blobs `blob` provides.
pub(crate) fn build_from_manifest(
    images: &OciImages,
    name: &str,
    source: &str,
    digest: &str,
    manifest: &ManifestOrIndex,
    limits: Limits,
    mut blob: impl FnMut(&str, u64) -> Result<std::path::PathBuf, OciError>,
) -> Result<OciImage, OciError> {
    let cfg = manifest.config.as_ref().expect("parse checked");
    blob(&cfg.digest, cfg.size)?;
    let config = load_config(&images.blobs(), &cfg.digest)?;
    check_arch(images, &config, source)?;
    let mut layers = Vec::new();
    for l in &manifest.layers {
        if !l.media_type.is_empty() && !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(OciError::UnsupportedMediaType(l.media_type.clone()));
        }
        layers.push((l.digest.clone(), blob(&l.digest, l.size)?));
    }
    images.build(
        name,
        Origin {
            source,
            digest,
            config_digest: Some(&cfg.digest),
        },
        &config,
        &layers,
        limits.unpacked_bytes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_symlinks_resolve_inside_only() {
        let r = |at: &str, t: &str| resolve_link(Path::new(at), Path::new(t));
        assert_eq!(
            r("b/layer.tar", "../a/layer.tar").as_deref(),
            Some("a/layer.tar")
        );
        assert_eq!(
            r("b/layer.tar", "/a/layer.tar").as_deref(),
            Some("a/layer.tar")
        );
        assert_eq!(r("b/layer.tar", "x.tar").as_deref(), Some("b/x.tar"));
        assert_eq!(r("b/layer.tar", "../../etc/passwd"), None);
        assert_eq!(r("layer.tar", "../x"), None);
    }
}
