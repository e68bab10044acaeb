//! The VMM's own mount namespace: a small tmpfs root holding the host's
//! `/usr` (read-only, for the binary, its libraries and firmware), a few
//! device nodes, and exactly the files of its VM, each bind-mounted at the
//! path it has on the host (so the command line is the same confined or
//! not). Built between fork and exec from a plan computed before the fork:
//! [`JailPlan::enter`] makes only system calls, no allocation.
//!
//! A VMM that opens device nodes itself (Firecracker opens `/dev/kvm` and
//! `/dev/net/tun` by path) gets its own nodes made in the jail with
//! `mknod`, owned by the VMM user, mode 0600 ([`DevNode`]) — what
//! Firecracker's `jailer` does in its chroot — so the host's nodes keep
//! their modes.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// What to bind into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path (the same path inside).
    pub path: PathBuf,
    /// A directory (else a file or device node).
    pub dir: bool,
    /// Read-only inside.
    pub read_only: bool,
}

/// A character device node made in the jail (not bound from the host),
/// owned by the VMM user, mode 0600.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevNode {
    /// Path inside the jail (absolute, normal).
    pub path: &'static str,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

/// `/dev/kvm` (misc device, minor 232, fixed by the kernel).
pub const KVM_NODE: DevNode = DevNode {
    path: "/dev/kvm",
    major: 10,
    minor: 232,
};
/// `/dev/net/tun` (misc device, minor 200, fixed by the kernel).
pub const TUN_NODE: DevNode = DevNode {
    path: "/dev/net/tun",
    major: 10,
    minor: 200,
};

/// One step of building the jail.
#[derive(Debug)]
enum Step {
    Mkdir(CString),
    /// Creates an empty file to bind a file onto.
    Touch(CString),
    Symlink {
        target: CString,
        at: CString,
    },
    Bind {
        src: CString,
        dst: CString,
        read_only: bool,
    },
    /// `mknod` a character device, then `chown` it.
    Mknod {
        at: CString,
        dev: libc::dev_t,
        uid: libc::uid_t,
        gid: libc::gid_t,
    },
}

/// The precomputed jail.
#[derive(Debug)]
pub struct JailPlan {
    root: CString,
    steps: Vec<Step>,
    tmpfs: CString,
    tmpfs_opts: CString,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", p.display()),
        )
    })
}

/// `root` + absolute `p`.
fn inside(root: &Path, p: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for c in p.components() {
        if let Component::Normal(n) = c {
            out.push(n);
        }
    }
    out
}

impl JailPlan {
    /// A jail mounted (in the child's namespace only) on `root`, an
    /// existing empty directory, with the host's top-level `lib*`/`bin`
    /// symlinks, `/usr` read-only and `binds`. Every bind path must be
    /// absolute and normal (no `..`).
    pub fn new(root: &Path, binds: &[Bind]) -> io::Result<JailPlan> {
        Self::with_nodes(root, binds, &[], (0, 0))
    }

    /// [`JailPlan::new`] plus device `nodes` made in the jail, owned by
    /// `owner` (uid, gid), mode 0600.
    pub fn with_nodes(
        root: &Path,
        binds: &[Bind],
        nodes: &[DevNode],
        owner: (u32, u32),
    ) -> io::Result<JailPlan> {
        let mut all: Vec<Bind> = vec![Bind {
            path: "/usr".into(),
            dir: true,
            read_only: true,
        }];
        let mut steps = Vec::new();
        // Merged-/usr hosts have /lib → usr/lib; others have real dirs.
        for top in ["lib", "lib64", "lib32", "libx32", "bin", "sbin"] {
            let host = Path::new("/").join(top);
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(&host)?;
                    steps.push(Step::Symlink {
                        target: cstr(&target)?,
                        at: cstr(&inside(root, &host))?,
                    });
                }
                Ok(m) if m.is_dir() => all.push(Bind {
                    path: host,
                    dir: true,
                    read_only: true,
                }),
                _ => {}
            }
        }
        all.extend(binds.iter().cloned());
        // Parents first, each once.
        let mut dirs = BTreeSet::new();
        for b in &all {
            if !b.path.is_absolute() || b.path.components().any(|c| c == Component::ParentDir) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not an absolute, normal path", b.path.display()),
                ));
            }
            let mut p = PathBuf::from("/");
            let comps: Vec<_> = b.path.components().skip(1).collect();
            let upto = if b.dir { comps.len() } else { comps.len() - 1 };
            for c in &comps[..upto] {
                p.push(c);
                dirs.insert(p.clone());
            }
        }
        for n in nodes {
            let p = Path::new(n.path);
            if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not an absolute, normal path", p.display()),
                ));
            }
            let mut d = PathBuf::from("/");
            let comps: Vec<_> = p.components().skip(1).collect();
            for c in &comps[..comps.len().saturating_sub(1)] {
                d.push(c);
                dirs.insert(d.clone());
            }
        }
        // BTreeSet order puts a parent before its children.
        let mut mk: Vec<Step> = Vec::new();
        for d in &dirs {
            mk.push(Step::Mkdir(cstr(&inside(root, d))?));
        }
        let mut binds_out = Vec::new();
        for b in &all {
            let dst = cstr(&inside(root, &b.path))?;
            if !b.dir {
                binds_out.push(Step::Touch(dst.clone()));
            }
            binds_out.push(Step::Bind {
                src: cstr(&b.path)?,
                dst,
                read_only: b.read_only,
            });
        }
        for n in nodes {
            binds_out.push(Step::Mknod {
                at: cstr(&inside(root, Path::new(n.path)))?,
                dev: libc::makedev(n.major, n.minor),
                uid: owner.0,
                gid: owner.1,
            });
        }
        mk.append(&mut steps);
        mk.append(&mut binds_out);
        Ok(JailPlan {
            root: cstr(root)?,
            steps: mk,
            tmpfs: CString::new("tmpfs").expect("no NUL"),
            tmpfs_opts: CString::new("mode=0755,size=1m").expect("no NUL"),
        })
    }

    /// Enters a new mount namespace, builds the jail and makes it the root.
    /// Between fork and exec only: system calls on precomputed strings.
    pub(crate) fn enter(&self) -> io::Result<()> {
        fn check(rc: libc::c_int) -> io::Result<()> {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is a NUL-terminated string owned by `self`
        // (or null where the call allows it); no allocation happens here.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing we mount propagates back to the host.
            let root = c"/".as_ptr();
            check(libc::mount(
                null,
                root,
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                self.tmpfs.as_ptr(),
                self.root.as_ptr(),
                self.tmpfs.as_ptr(),
                libc::MS_NOSUID,
                self.tmpfs_opts.as_ptr().cast(),
            ))?;
            for s in &self.steps {
                match s {
                    Step::Mkdir(p) => {
                        if libc::mkdir(p.as_ptr(), 0o755) < 0
                            && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                        {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Step::Touch(p) => {
                        let fd = libc::open(
                            p.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o600,
                        );
                        if fd < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        libc::close(fd);
                    }
                    Step::Mknod { at, dev, uid, gid } => {
                        check(libc::mknod(at.as_ptr(), libc::S_IFCHR | 0o600, *dev))?;
                        check(libc::chown(at.as_ptr(), *uid, *gid))?;
                    }
                    Step::Symlink { target, at } => {
                        check(libc::symlink(target.as_ptr(), at.as_ptr()))?;
                    }
                    Step::Bind {
                        src,
                        dst,
                        read_only,
                    } => {
                        check(libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ))?;
                        if *read_only {
                            check(libc::mount(
                                null,
                                dst.as_ptr(),
                                null,
                                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                                std::ptr::null(),
                            ))?;
                        }
                    }
                }
            }
            // The jail's own tmpfs read-only too.
            check(libc::mount(
                null,
                self.root.as_ptr(),
                null,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID,
                std::ptr::null(),
            ))?;
            // pivot_root(".", "."): the old root ends up stacked under the
            // new one and is detached at once.
            check(libc::chdir(self.root.as_ptr()))?;
            let dot = c".".as_ptr();
            check(libc::syscall(libc::SYS_pivot_root, dot, dot) as libc::c_int)?;
            check(libc::umount2(dot, libc::MNT_DETACH))?;
            check(libc::chdir(root))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_makes_parents_once_and_binds_in_order() {
        let binds = [
            Bind {
                path: "/data/images/kernel/vmlinux".into(),
                dir: false,
                read_only: true,
            },
            Bind {
                path: "/data/sandboxes/sb-1/disk.ext4".into(),
                dir: false,
                read_only: false,
            },
            Bind {
                path: "/dev/null".into(),
                dir: false,
                read_only: false,
            },
        ];
        let plan = JailPlan::new(Path::new("/run/j"), &binds).unwrap();
        let text = format!("{:?}", plan.steps);
        for d in [
            "/run/j/data\"",
            "/run/j/data/images\"",
            "/run/j/data/images/kernel\"",
            "/run/j/data/sandboxes/sb-1\"",
            "/run/j/dev\"",
            "/run/j/usr\"",
        ] {
            assert_eq!(
                text.matches(&format!("Mkdir(\"{d}")).count(),
                1,
                "{d} in {text}"
            );
        }
        assert!(!text.contains("Mkdir(\"/run/j/data/images/kernel/vmlinux\")"));
        assert!(text.contains("Touch(\"/run/j/data/images/kernel/vmlinux\")"));
        let usr = text.find("src: \"/usr\"").unwrap();
        let kernel = text.find("src: \"/data/images/kernel/vmlinux\"").unwrap();
        assert!(usr < kernel);
        assert!(text.contains(
            "Bind { src: \"/data/sandboxes/sb-1/disk.ext4\", dst: \"/run/j/data/sandboxes/sb-1/disk.ext4\", read_only: false }"
        ));
    }

    #[test]
    fn device_nodes_are_made_owned_by_the_vmm_user() {
        let plan =
            JailPlan::with_nodes(Path::new("/run/j"), &[], &[KVM_NODE, TUN_NODE], (999, 995))
                .unwrap();
        let text = format!("{:?}", plan.steps);
        for d in ["/run/j/dev\"", "/run/j/dev/net\""] {
            assert_eq!(
                text.matches(&format!("Mkdir(\"{d})")).count(),
                1,
                "{d} in {text}"
            );
        }
        let kvm = format!(
            "Mknod {{ at: \"/run/j/dev/kvm\", dev: {}, uid: 999, gid: 995 }}",
            libc::makedev(10, 232)
        );
        let tun = format!(
            "Mknod {{ at: \"/run/j/dev/net/tun\", dev: {}, uid: 999, gid: 995 }}",
            libc::makedev(10, 200)
        );
        assert!(text.contains(&kvm), "{text}");
        assert!(text.contains(&tun), "{text}");
        // Parents exist before the node is made.
        assert!(text.find("Mkdir(\"/run/j/dev/net\")").unwrap() < text.find(&tun).unwrap());
        // Nothing of the host's /dev is bound.
        assert!(!text.contains("src: \"/dev"), "{text}");
    }

    #[test]
    fn relative_or_dotdot_paths_are_refused() {
        for p in ["rel/x", "/a/../etc/shadow"] {
            let b = Bind {
                path: p.into(),
                dir: false,
                read_only: true,
            };
            assert!(JailPlan::new(Path::new("/run/j"), &[b]).is_err(), "{p}");
        }
    }
}
