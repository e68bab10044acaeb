//! Generates the envd message types (prost) and their proto3 JSON
//! mapping (pbjson) from `proto/`, parsed by protox: no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/process/process.proto",
        "proto/filesystem/filesystem.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let set_path = out.join("envd_descriptor.bin");
    std::fs::write(&set_path, prost::Message::encode_to_vec(&descriptors))?;
    let mut config = prost_build::Config::new();
    config
        .file_descriptor_set_path(&set_path)
        .skip_protoc_run()
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types");
    config.compile_protos(&files, &["proto"])?;
    let set = std::fs::read(&set_path)?;
    // Like envd: fields a newer SDK sends are ignored, not refused.
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .ignore_unknown_fields()
        .build(&[".process", ".filesystem"])?;
    Ok(())
}
