//! The OCI image-spec and Docker v2 documents this client reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::OciError;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker v2 manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Layer media types this client unpacks (plain or gzip tar).
pub const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// The `Accept` header for manifests.
pub fn accept_header() -> String {
    [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ")
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// For index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (OCI layouts name their images here).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An index entry's platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `linux`.
    pub os: String,
    /// `v8`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// A manifest or an index (both parse into this; `layers` or `manifests`
/// is empty).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestOrIndex {
    /// Schema version (2).
    #[serde(default)]
    pub schema_version: u32,
    /// Media type, when the document says.
    #[serde(default)]
    pub media_type: Option<String>,
    /// Image manifest: its config.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// Image manifest: its layers, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Index: its manifests.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl ManifestOrIndex {
    /// Parses `bytes`; `content_type` (the HTTP header, if any) wins over
    /// the document's own mediaType.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<(Self, Kind), OciError> {
        let doc: Self = serde_json::from_slice(bytes).map_err(|source| OciError::Json {
            what: "manifest".into(),
            error: source,
        })?;
        let mt = content_type
            .map(|c| c.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|c| !c.is_empty() && c != "application/json" && c != "text/plain")
            .or_else(|| doc.media_type.clone());
        let kind = match mt.as_deref() {
            Some(OCI_INDEX) | Some(DOCKER_LIST) => Kind::Index,
            Some(OCI_MANIFEST) | Some(DOCKER_MANIFEST) => Kind::Manifest,
            None if !doc.manifests.is_empty() => Kind::Index,
            None if doc.config.is_some() => Kind::Manifest,
            Some(other) => return Err(OciError::UnsupportedMediaType(other.to_owned())),
            None => return Err(OciError::UnsupportedMediaType("(none)".into())),
        };
        if kind == Kind::Manifest && doc.config.is_none() {
            return Err(OciError::UnsupportedMediaType(
                "an image manifest without a config".into(),
            ));
        }
        Ok((doc, kind))
    }

    /// An index's entry for linux/`arch`.
    pub fn pick(&self, arch: &str, reference: &str) -> Result<&Descriptor, OciError> {
        self.manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .ok_or_else(|| OciError::NoPlatform {
                arch: arch.to_owned(),
                reference: reference.to_owned(),
                available: self
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref())
                    .map(|p| format!("{}/{}", p.os, p.architecture))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Manifest or index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An image manifest.
    Manifest,
    /// An index / manifest list.
    Index,
}

/// The image configuration blob (the parts bhatti uses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfigBlob {
    /// `amd64`, …
    #[serde(default)]
    pub architecture: String,
    /// `linux`.
    #[serde(default)]
    pub os: String,
    /// The run configuration.
    #[serde(default)]
    pub config: Option<RunConfig>,
}

/// What a container of the image runs with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// `KEY=value` entries.
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Working directory.
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group`, `uid:gid`.
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Entrypoint.
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    /// Command.
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
}

/// Docker-archive `manifest.json` entry (`docker save`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DockerArchiveEntry {
    /// Path of the config JSON in the archive.
    pub config: String,
    /// `repo:tag` names.
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    /// Paths of the layer tars, bottom first.
    pub layers: Vec<String>,
}
