//! The initramfs: lohar as `/init`, the kernel modules the guest needs (in
//! load order), and the small text files that tell lohar what to load.
//! The layout is the contract with lohar; `docs/guest-image.md` describes it.
//!
//! ```text
//! /init                                  lohar (0755)
//! /dev/console                           char 5:1 (the kernel opens it for /init's stdio)
//! /dev /proc /sys /run /tmp /mnt         empty mount points
//! /lib/modules/<release>/kernel/….ko     plain (uncompressed) ELF modules
//! /etc/lohar/modules.load                module paths relative to /lib/modules/<release>/, load order, one per line
//! /etc/lohar/kernel-release              "<release>\n"
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::cpio::{CpioWriter, DeviceNumber};
use crate::error::{io, Error, Result};
use crate::kmod::{self, parse_modules_dep};

/// The modules the guest needs: virtio transports and devices, overlayfs,
/// ext4, vsock, packet sockets. Those built into the kernel are skipped
/// (in Debian's 6.1 cloud kernel: ext4 with jbd2/mbcache/crc16/crc32c, and
/// af_packet).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "overlay",
    "ext4",
    "vsock",
    "vmw_vsock_virtio_transport",
    "af_packet",
];

/// Where lohar finds its module list.
pub const MODULES_LOAD_PATH: &str = "etc/lohar/modules.load";
/// Where lohar finds the kernel release.
pub const KERNEL_RELEASE_PATH: &str = "etc/lohar/kernel-release";

/// An extra file placed in the initramfs (tests use this for a shell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraFile {
    /// Absolute path inside the initramfs.
    pub guest_path: String,
    /// File on the host to copy.
    pub source: PathBuf,
    /// Permission bits.
    pub mode: u32,
}

/// What goes into an initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// The program to run as `/init` (lohar; a static binary).
    pub init: PathBuf,
    /// The kernel's modules tree (`…/modules/<release>`, with `modules.dep`).
    pub modules_dir: PathBuf,
    /// Kernel release.
    pub release: String,
    /// Module names wanted (dependencies are added).
    pub modules: Vec<String>,
    /// Additional files.
    pub extra_files: Vec<ExtraFile>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsReport {
    /// Module paths (relative to `/lib/modules/<release>/`) in load order.
    pub load_order: Vec<String>,
    /// Wanted modules that are built into the kernel.
    pub builtin: Vec<String>,
    /// Archive size in bytes.
    pub size: u64,
}

enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
    Char(u32, DeviceNumber),
}

/// Builds an uncompressed newc initramfs at `out` (written to a temp file
/// and renamed into place).
///
/// Uncompressed: for a ~3 MB archive gzip made no measurable difference to
/// boot time under QEMU TCG (docs/guest-image.md), and this needs no
/// compressor.
pub fn write_initramfs(spec: &InitramfsSpec, out: &Path) -> Result<InitramfsReport> {
    let dep_path = spec.modules_dir.join("modules.dep");
    let dep_text = std::fs::read_to_string(&dep_path).map_err(io("read", &dep_path))?;
    let graph = parse_modules_dep(&dep_text)?;
    let builtin_path = spec.modules_dir.join("modules.builtin");
    let builtin: BTreeSet<String> = match std::fs::read_to_string(&builtin_path) {
        Ok(t) => t
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(kmod::name_of)
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => return Err(io("read", &builtin_path)(e)),
    };
    let load_order_src = kmod::resolve(&graph, &builtin, &spec.modules)?;
    let builtin_wanted: Vec<String> = spec
        .modules
        .iter()
        .map(|m| kmod::normalize(m))
        .filter(|m| builtin.contains(m) && !graph.contains_key(m))
        .collect();

    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for d in ["dev", "proc", "sys", "run", "tmp", "mnt", "etc/lohar"] {
        add_dir_all(&mut nodes, d);
    }
    nodes.insert("tmp".into(), Node::Dir(0o1777));
    nodes.insert(
        "dev/console".into(),
        Node::Char(0o600, DeviceNumber { major: 5, minor: 1 }),
    );
    if !spec.init.is_file() {
        return Err(Error::MissingInput {
            what: "init binary",
            path: spec.init.clone(),
        });
    }
    let init = std::fs::read(&spec.init).map_err(io("read", &spec.init))?;
    nodes.insert("init".into(), Node::File(0o755, init));

    let mut load_order = Vec::with_capacity(load_order_src.len());
    for rel in &load_order_src {
        let src = spec.modules_dir.join(rel);
        let data = kmod::read_module(&src)?;
        // Stored uncompressed: lohar calls init_module on the bytes as they are.
        let plain = match rel.find(".ko") {
            Some(i) => format!("{}.ko", &rel[..i]),
            None => rel.clone(),
        };
        let guest = format!("lib/modules/{}/{}", spec.release, plain);
        if let Some((parent, _)) = guest.rsplit_once('/') {
            add_dir_all(&mut nodes, parent);
        }
        nodes.insert(guest, Node::File(0o644, data));
        load_order.push(plain);
    }
    let mut list = load_order.join("\n");
    list.push('\n');
    nodes.insert(
        MODULES_LOAD_PATH.into(),
        Node::File(0o644, list.into_bytes()),
    );
    nodes.insert(
        KERNEL_RELEASE_PATH.into(),
        Node::File(0o644, format!("{}\n", spec.release).into_bytes()),
    );
    for extra in &spec.extra_files {
        let guest = extra.guest_path.trim_start_matches('/').to_owned();
        let data = std::fs::read(&extra.source).map_err(io("read", &extra.source))?;
        if let Some((parent, _)) = guest.rsplit_once('/') {
            add_dir_all(&mut nodes, parent);
        }
        nodes.insert(guest, Node::File(extra.mode, data));
    }

    let tmp = out.with_extension("cpio.tmp");
    let file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(file));
    // BTreeMap order puts every directory before its contents.
    for (path, node) in &nodes {
        match node {
            Node::Dir(mode) => w.dir(path, *mode),
            Node::File(mode, data) => w.file(path, *mode, data),
            Node::Char(mode, dev) => w.char_device(path, *mode, *dev),
        }
        .map_err(io("write", &tmp))?;
    }
    let (buf, size) = w.finish().map_err(io("write", &tmp))?;
    let file = buf
        .into_inner()
        .map_err(|e| io("write", &tmp)(e.into_error()))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, out).map_err(io("rename", &tmp))?;
    Ok(InitramfsReport {
        load_order,
        builtin: builtin_wanted,
        size,
    })
}

fn add_dir_all(nodes: &mut BTreeMap<String, Node>, path: &str) {
    let mut cur = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if !cur.is_empty() {
            cur.push('/');
        }
        cur.push_str(part);
        nodes.entry(cur.clone()).or_insert(Node::Dir(0o755));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn layout_matches_contract() {
        let dir = tempfile::tempdir().unwrap();
        let mods = dir.path().join("modules/6.1.0-test");
        std::fs::create_dir_all(mods.join("kernel/drivers/virtio")).unwrap();
        let elf = crate::elf::tests::sample_elf(b"name=x\0", None);
        for m in ["virtio", "virtio_ring", "virtio_blk"] {
            std::fs::write(mods.join(format!("kernel/drivers/virtio/{m}.ko")), &elf).unwrap();
        }
        std::fs::write(
            mods.join("modules.dep"),
            "kernel/drivers/virtio/virtio.ko:\nkernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        std::fs::write(mods.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let init = dir.path().join("lohar");
        std::fs::write(&init, b"#!/bin/sh\n").unwrap();
        let out = dir.path().join("initramfs.cpio");
        let spec = InitramfsSpec {
            init,
            modules_dir: mods,
            release: "6.1.0-test".into(),
            modules: vec!["virtio_blk".into(), "ext4".into()],
            extra_files: vec![],
        };
        let report = write_initramfs(&spec, &out).unwrap();
        assert_eq!(
            report.load_order,
            vec![
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio_blk.ko"
            ]
        );
        assert_eq!(report.builtin, vec!["ext4"]);
        let x = dir.path().join("x");
        std::fs::create_dir(&x).unwrap();
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -idm --quiet < {}", out.display()))
            .current_dir(&x)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(
            std::fs::read_to_string(x.join(MODULES_LOAD_PATH)).unwrap(),
            report.load_order.join("\n") + "\n"
        );
        assert_eq!(
            std::fs::read_to_string(x.join(KERNEL_RELEASE_PATH)).unwrap(),
            "6.1.0-test\n"
        );
        assert_eq!(
            std::fs::read(x.join("lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_ring.ko"))
                .unwrap(),
            elf
        );
        assert!(x.join("init").is_file());
        assert!(!dir.path().join("initramfs.cpio.tmp").exists());
    }
}
