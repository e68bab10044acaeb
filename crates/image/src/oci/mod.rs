//! OCI images: references, a registry client, `import` of docker-archive
//! and OCI-layout tars, safe layer unpacking, and building a read-only base
//! root filesystem from them. See `docs/images.md`.

pub mod blobs;
mod error;
pub mod images;
pub mod import;
pub mod reference;
pub mod registry;
pub mod spec;
pub mod unpack;

pub use error::OciError;
pub use images::{validate_name, BlobLock, OciImage, OciImages, Origin};
pub use import::{import_archive, Limits};
pub use reference::{Reference, ReferenceError};
pub use registry::{AddressPolicy, Credentials, PullOptions, Puller};
