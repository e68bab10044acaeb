//! Errors of pulling, importing and unpacking OCI images.

use std::path::PathBuf;

use super::reference::ReferenceError;

/// Why an OCI image could not be pulled, imported or built.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The image reference does not parse.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A local image name is not acceptable.
    #[error("invalid image name '{name}': {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A layer entry would write outside the staging root, or is otherwise
    /// refused.
    #[error("refusing layer entry '{path}': {reason}")]
    UnsafeEntry {
        /// The entry's path as the tar names it.
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A filesystem operation failed.
    #[error("cannot {op} {path}: {error}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// Underlying error (in the message, not the source chain, so
        /// that it is printed once).
        error: std::io::Error,
    },
    /// A layer or archive is not a readable tar (or gzip) stream.
    #[error("unreadable {what}: {error}")]
    Tar {
        /// Which stream.
        what: String,
        /// Underlying error.
        error: std::io::Error,
    },
    /// Something is larger than the caller's budget.
    #[error("{what} is too large: more than {limit} bytes")]
    TooLarge {
        /// What.
        what: String,
        /// The budget in bytes.
        limit: u64,
    },
    /// Content does not hash to the digest that names it.
    #[error("{what}: digest mismatch (expected {expected}, got {actual})")]
    DigestMismatch {
        /// What was checked.
        what: String,
        /// The digest that names it.
        expected: String,
        /// What it hashes to.
        actual: String,
    },
    /// A digest is not `sha256:` and 64 lowercase hex digits.
    #[error("unsupported or malformed digest '{0}' (only sha256 is supported)")]
    BadDigest(String),
    /// A media type this client does not handle.
    #[error("unsupported media type '{0}'")]
    UnsupportedMediaType(String),
    /// A JSON document (manifest, index, config) does not parse.
    #[error("malformed {what}: {error}")]
    Json {
        /// Which document.
        what: String,
        /// Underlying error.
        error: serde_json::Error,
    },
    /// An archive given to `import` is not a docker-archive or OCI layout.
    #[error("{path} is not a docker-archive or OCI-layout tar: {reason}")]
    BadArchive {
        /// The archive.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The manifest list has no image for this platform.
    #[error("no linux/{arch} image in {reference} (available: {available})")]
    NoPlatform {
        /// The architecture looked for (`amd64`, `arm64`).
        arch: String,
        /// The reference.
        reference: String,
        /// The platforms it has.
        available: String,
    },
    /// The registry does not have the repository, tag or blob.
    #[error("not found in registry {registry}: {what}")]
    NotFound {
        /// The registry.
        registry: String,
        /// What was asked for.
        what: String,
    },
    /// The registry refused the credentials (or asks for some).
    #[error("registry {registry} refused access: {message}")]
    Unauthorized {
        /// The registry.
        registry: String,
        /// Its explanation.
        message: String,
    },
    /// The registry, its token realm or a redirect is at an address the
    /// pull may not reach (the daemon's host, its LAN, link-local…).
    #[error("registry {registry} may not be pulled from: {message}")]
    AddressRefused {
        /// The registry.
        registry: String,
        /// Which address, and why.
        message: String,
    },
    /// The registry cannot be reached.
    #[error("cannot reach registry {registry}: {message}")]
    Unreachable {
        /// The registry.
        registry: String,
        /// The transport error.
        message: String,
    },
    /// The registry answered with an unexpected status.
    #[error("registry {registry} answered {status} for {what}: {message}")]
    Registry {
        /// The registry.
        registry: String,
        /// HTTP status.
        status: u16,
        /// The request.
        what: String,
        /// The body's start.
        message: String,
    },
    /// Building the root filesystem failed.
    #[error("building the image's root filesystem: {0}")]
    Build(String),
}

impl From<crate::Error> for OciError {
    fn from(e: crate::Error) -> Self {
        let mut message = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        Self::Build(message)
    }
}

pub(crate) fn io(
    op: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> OciError {
    let path = path.to_owned();
    move |error| OciError::Io { op, path, error }
}
