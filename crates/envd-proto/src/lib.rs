//! The messages of E2B's envd `process.Process` and `filesystem.Filesystem`
//! services, generated at build time from `proto/` (prost for the binary
//! encoding, pbjson for the proto3 JSON mapping the `e2b` SDKs send).

#![allow(missing_debug_implementations, clippy::all)]

pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

pub use pbjson_types::Timestamp;
