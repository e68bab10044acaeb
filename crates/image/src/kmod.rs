//! Kernel modules: reading `.modinfo`, writing and parsing `modules.dep`, and
//! resolving a wanted set of modules into a load order (dependencies first).
//!
//! Debian's kernel package ships no `modules.dep` (its postinst runs `depmod`),
//! so [`ModuleIndex::scan`] builds it from each module's `.modinfo`
//! `depends=` field — the dependency list `modpost` computed at build time,
//! the same one `depmod` would derive from symbols.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::{run_with_input, CommandError};
use crate::elf::{Elf, ElfError};

/// Why module metadata could not be read or resolved.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    /// Reading the modules tree failed.
    #[error("Cannot read {path}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A `.ko` is not a valid ELF object.
    #[error("Module {path} is not a valid ELF object")]
    Elf {
        /// Module path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: ElfError,
    },
    /// A compressed module could not be decompressed.
    #[error("Cannot decompress module {path}")]
    Decompress {
        /// Module path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: CommandError,
    },
    /// A wanted module is neither a module nor built into the kernel.
    #[error("Module '{0}' is neither built in nor in the modules tree")]
    Unknown(String),
    /// A module depends on one that does not exist.
    #[error("Module '{module}' depends on missing module '{dependency}'")]
    MissingDependency {
        /// The dependent module.
        module: String,
        /// The missing dependency.
        dependency: String,
    },
    /// The dependency graph has a cycle.
    #[error("Module dependency cycle through '{0}'")]
    Cycle(String),
    /// A `modules.dep` line is malformed.
    #[error("modules.dep line {line}: {text}")]
    DepSyntax {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
}

/// The canonical module name (`-` and `_` are interchangeable in module names).
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path such as `kernel/net/vmw_vsock/vsock.ko.xz`.
pub fn name_of(rel_path: &str) -> String {
    let file = rel_path.rsplit('/').next().unwrap_or(rel_path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize(stem)
}

/// Fields of a module's `.modinfo` that the pipeline uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModInfo {
    /// `name=` (absent in some older modules).
    pub name: Option<String>,
    /// `depends=`, normalised.
    pub depends: Vec<String>,
    /// `vermagic=`.
    pub vermagic: Option<String>,
}

/// Parses the NUL-separated `key=value` strings of a `.modinfo` section.
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in section.split(|b| *b == 0) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = Some(normalize(value)),
            "vermagic" => info.vermagic = Some(value.to_owned()),
            "depends" => {
                info.depends = value
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(normalize)
                    .collect()
            }
            _ => {}
        }
    }
    info
}

/// How a module file is compressed, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleCompression {
    /// Plain `.ko`.
    None,
    /// `.ko.xz`.
    Xz,
    /// `.ko.zst`.
    Zstd,
    /// `.ko.gz`.
    Gzip,
}

impl ModuleCompression {
    /// Classifies a file name; `None` if it is not a module at all.
    pub fn of(file_name: &str) -> Option<Self> {
        if file_name.ends_with(".ko") {
            Some(Self::None)
        } else if file_name.ends_with(".ko.xz") {
            Some(Self::Xz)
        } else if file_name.ends_with(".ko.zst") {
            Some(Self::Zstd)
        } else if file_name.ends_with(".ko.gz") {
            Some(Self::Gzip)
        } else {
            None
        }
    }
}

/// Reads a module file and returns plain ELF bytes, decompressing
/// `.ko.xz`/`.ko.zst`/`.ko.gz` so the guest can `init_module` them directly.
pub fn read_module(path: &Path) -> Result<Vec<u8>, KmodError> {
    let bytes = std::fs::read(path).map_err(|source| KmodError::Io {
        path: path.to_owned(),
        source,
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tool = match ModuleCompression::of(&name) {
        None | Some(ModuleCompression::None) => return Ok(bytes),
        Some(ModuleCompression::Xz) => "xz",
        Some(ModuleCompression::Zstd) => "zstd",
        Some(ModuleCompression::Gzip) => "gzip",
    };
    run_with_input(Command::new(tool).arg("-dcq"), &bytes).map_err(|source| KmodError::Decompress {
        path: path.to_owned(),
        source,
    })
}

/// One module of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Path relative to `/lib/modules/<release>/`, as found (maybe compressed).
    pub rel_path: String,
    /// Direct dependencies (module names).
    pub depends: Vec<String>,
}

/// Every module of one kernel's modules tree, plus its built-in list.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    /// Modules by canonical name.
    pub modules: BTreeMap<String, ModuleEntry>,
    /// Names of modules built into the kernel (`modules.builtin`).
    pub builtin: BTreeSet<String>,
}

impl ModuleIndex {
    /// Scans `/lib/modules/<release>/` (given as `root`): every module's
    /// `.modinfo`, and `modules.builtin`.
    pub fn scan(root: &Path) -> Result<Self, KmodError> {
        let mut index = Self::default();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let io = |source| KmodError::Io {
                path: dir.clone(),
                source,
            };
            for entry in std::fs::read_dir(&dir).map_err(io)? {
                let entry = entry.map_err(io)?;
                let path = entry.path();
                let kind = entry.file_type().map_err(io)?;
                if kind.is_dir() {
                    stack.push(path);
                    continue;
                }
                let file = entry.file_name().to_string_lossy().into_owned();
                if !kind.is_file() || ModuleCompression::of(&file).is_none() {
                    continue;
                }
                let bytes = read_module(&path)?;
                let elf = Elf::parse(&bytes).map_err(|source| KmodError::Elf {
                    path: path.clone(),
                    source,
                })?;
                let section = elf.section(".modinfo").map_err(|source| KmodError::Elf {
                    path: path.clone(),
                    source,
                })?;
                let info = parse_modinfo(section.unwrap_or_default());
                let rel = path
                    .strip_prefix(root)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or(file);
                let name = info.name.clone().unwrap_or_else(|| name_of(&rel));
                index.modules.insert(
                    name,
                    ModuleEntry {
                        rel_path: rel,
                        depends: info.depends,
                    },
                );
            }
        }
        let builtin_path = root.join("modules.builtin");
        match std::fs::read_to_string(&builtin_path) {
            Ok(text) => {
                index.builtin = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(name_of)
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(KmodError::Io {
                    path: builtin_path,
                    source,
                })
            }
        }
        Ok(index)
    }

    /// Renders `modules.dep` in depmod's format: each module followed by its
    /// whole dependency closure, ordered so that loading the list from right
    /// to left works.
    pub fn to_modules_dep(&self) -> Result<String, KmodError> {
        let mut out = String::new();
        for (name, entry) in &self.modules {
            let order = self.load_order(std::slice::from_ref(name))?;
            let deps: Vec<&str> = order
                .iter()
                .rev()
                .skip(1) // the module itself comes last in load order
                .map(String::as_str)
                .collect();
            out.push_str(&entry.rel_path);
            out.push(':');
            for d in deps {
                out.push(' ');
                out.push_str(d);
            }
            out.push('\n');
        }
        Ok(out)
    }

    /// Paths (relative to the release directory) of `wanted` and everything
    /// they depend on, dependencies first. Built-in modules are skipped.
    pub fn load_order(&self, wanted: &[String]) -> Result<Vec<String>, KmodError> {
        let graph: BTreeMap<String, (String, Vec<String>)> = self
            .modules
            .iter()
            .map(|(n, e)| (n.clone(), (e.rel_path.clone(), e.depends.clone())))
            .collect();
        resolve(&graph, &self.builtin, wanted)
    }
}

/// Parses `modules.dep` into `name -> (path, dependency names)`.
pub fn parse_modules_dep(text: &str) -> Result<BTreeMap<String, (String, Vec<String>)>, KmodError> {
    let mut graph = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((path, deps)) = line.split_once(':') else {
            return Err(KmodError::DepSyntax {
                line: i + 1,
                text: line.to_owned(),
            });
        };
        let path = path.trim();
        if ModuleCompression::of(path).is_none() {
            return Err(KmodError::DepSyntax {
                line: i + 1,
                text: line.to_owned(),
            });
        }
        let deps = deps.split_whitespace().map(name_of).collect();
        graph.insert(name_of(path), (path.to_owned(), deps));
    }
    Ok(graph)
}

/// Resolves `wanted` module names against a dependency graph
/// (`name -> (path, deps)`) into a load order of paths, dependencies first.
/// Wanted modules that are built in are skipped; unknown ones are an error.
pub fn resolve(
    graph: &BTreeMap<String, (String, Vec<String>)>,
    builtin: &BTreeSet<String>,
    wanted: &[String],
) -> Result<Vec<String>, KmodError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    let mut marks: BTreeMap<String, Mark> = BTreeMap::new();
    let mut order = Vec::new();
    // Iterative DFS, post-order: (name, next dependency index).
    for root in wanted {
        let root = normalize(root);
        if builtin.contains(&root) && !graph.contains_key(&root) {
            continue;
        }
        if !graph.contains_key(&root) {
            return Err(KmodError::Unknown(root));
        }
        let mut stack: Vec<(String, usize)> = vec![(root, 0)];
        while let Some((name, idx)) = stack.pop() {
            if idx == 0 {
                match marks.get(&name) {
                    Some(Mark::Done) => continue,
                    Some(Mark::Visiting) => return Err(KmodError::Cycle(name)),
                    None => {
                        marks.insert(name.clone(), Mark::Visiting);
                    }
                }
            }
            let Some((path, deps)) = graph.get(&name) else {
                return Err(KmodError::Unknown(name));
            };
            if let Some(dep) = deps.get(idx) {
                stack.push((name.clone(), idx + 1));
                match (graph.contains_key(dep), marks.get(dep)) {
                    (false, _) if builtin.contains(dep) => {}
                    (false, _) => {
                        return Err(KmodError::MissingDependency {
                            module: name,
                            dependency: dep.clone(),
                        })
                    }
                    (true, Some(Mark::Done)) => {}
                    (true, Some(Mark::Visiting)) => return Err(KmodError::Cycle(dep.clone())),
                    (true, None) => stack.push((dep.clone(), 0)),
                }
            } else {
                marks.insert(name, Mark::Done);
                order.push(path.clone());
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, (String, Vec<String>)> {
        edges
            .iter()
            .map(|(n, d)| {
                (
                    n.to_string(),
                    (
                        format!("kernel/{n}.ko"),
                        d.iter().map(|s| s.to_string()).collect(),
                    ),
                )
            })
            .collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn modinfo_fields() {
        let info = parse_modinfo(
            b"license=GPL\0depends=virtio,virtio-ring\0name=virtio_blk\0vermagic=6.1.0 SMP\0\0",
        );
        assert_eq!(info.name.as_deref(), Some("virtio_blk"));
        assert_eq!(info.depends, names(&["virtio", "virtio_ring"]));
        assert_eq!(info.vermagic.as_deref(), Some("6.1.0 SMP"));
        assert_eq!(parse_modinfo(b"depends=\0").depends, Vec::<String>::new());
    }

    #[test]
    fn names_from_paths() {
        assert_eq!(
            name_of("kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko"),
            "vmw_vsock_virtio_transport"
        );
        assert_eq!(name_of("kernel/fs/overlayfs/overlay.ko.zst"), "overlay");
        assert_eq!(name_of("kernel/x/crc-itu-t.ko.xz"), "crc_itu_t");
        assert_eq!(
            ModuleCompression::of("a.ko.gz"),
            Some(ModuleCompression::Gzip)
        );
        assert_eq!(ModuleCompression::of("modules.dep"), None);
    }

    #[test]
    fn deps_come_first_and_shared_deps_once() {
        let g = graph(&[
            ("virtio", &[]),
            ("virtio_ring", &["virtio"]),
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("virtio_net", &["net_failover", "virtio_ring", "virtio"]),
            ("net_failover", &["failover"]),
            ("failover", &[]),
        ]);
        let order = resolve(&g, &BTreeSet::new(), &names(&["virtio_blk", "virtio-net"])).unwrap();
        assert_eq!(
            order,
            names(&[
                "kernel/virtio.ko",
                "kernel/virtio_ring.ko",
                "kernel/virtio_blk.ko",
                "kernel/failover.ko",
                "kernel/net_failover.ko",
                "kernel/virtio_net.ko",
            ])
        );
    }

    #[test]
    fn builtin_skipped_unknown_rejected() {
        let g = graph(&[("overlay", &[]), ("jbd2_user", &["jbd2"])]);
        let builtin: BTreeSet<String> = names(&["ext4", "jbd2"]).into_iter().collect();
        let order = resolve(&g, &builtin, &names(&["ext4", "overlay", "jbd2_user"])).unwrap();
        assert_eq!(order, names(&["kernel/overlay.ko", "kernel/jbd2_user.ko"]));
        assert!(
            matches!(resolve(&g, &builtin, &names(&["nope"])), Err(KmodError::Unknown(n)) if n == "nope")
        );
        let g = graph(&[("a", &["ghost"])]);
        assert!(matches!(
            resolve(&g, &builtin, &names(&["a"])),
            Err(KmodError::MissingDependency { .. })
        ));
    }

    #[test]
    fn cycles_are_errors() {
        let g = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        assert!(matches!(
            resolve(&g, &BTreeSet::new(), &names(&["a"])),
            Err(KmodError::Cycle(_))
        ));
    }

    #[test]
    fn modules_dep_roundtrip() {
        let mut index = ModuleIndex::default();
        for (n, d) in [
            ("a", vec![]),
            ("b", vec!["a".to_string()]),
            ("c", vec!["b".to_string()]),
        ] {
            index.modules.insert(
                n.to_string(),
                ModuleEntry {
                    rel_path: format!("kernel/{n}.ko"),
                    depends: d,
                },
            );
        }
        let text = index.to_modules_dep().unwrap();
        assert_eq!(
            text,
            "kernel/a.ko:\nkernel/b.ko: kernel/a.ko\nkernel/c.ko: kernel/b.ko kernel/a.ko\n"
        );
        let parsed = parse_modules_dep(&text).unwrap();
        let order = resolve(&parsed, &BTreeSet::new(), &names(&["c"])).unwrap();
        assert_eq!(order, names(&["kernel/a.ko", "kernel/b.ko", "kernel/c.ko"]));
        assert!(matches!(
            parse_modules_dep("garbage line"),
            Err(KmodError::DepSyntax { line: 1, .. })
        ));
    }

    #[test]
    fn scan_reads_modinfo_and_builtin() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("kernel/drivers");
        std::fs::create_dir_all(&sub).unwrap();
        let a = crate::elf::tests::sample_elf(b"name=virtio\0depends=\0", None);
        let b = crate::elf::tests::sample_elf(b"name=virtio_blk\0depends=virtio\0", None);
        std::fs::write(sub.join("virtio.ko"), a).unwrap();
        let xz = run_with_input(Command::new("xz").args(["-c", "--check=crc32"]), &b).unwrap();
        std::fs::write(sub.join("virtio_blk.ko.xz"), xz).unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert!(index.builtin.contains("ext4"));
        assert_eq!(
            index.load_order(&names(&["virtio_blk", "ext4"])).unwrap(),
            names(&[
                "kernel/drivers/virtio.ko",
                "kernel/drivers/virtio_blk.ko.xz"
            ])
        );
    }
}
