//! VMM confinement: what a VMM process may touch if a guest escapes into
//! it through device emulation.
//!
//! A confined QEMU
//! * runs as an unprivileged system user (`bhatti-vmm` by default, created
//!   with `useradd --system` at daemon start when missing), never root;
//! * in its own mount namespace whose root is a small read-only tmpfs
//!   holding `/usr` (read-only), `/dev/{null,zero,random,urandom}` (and
//!   `/dev/kvm` under KVM) and exactly its VM's files — kernel, initramfs and
//!   image rootfs read-only, the sandbox disk, config drive and memory file
//!   — each at its host path ([`jail`]);
//! * under QEMU's seccomp filter (`-sandbox on,obsolete=deny,
//!   elevateprivileges=deny,spawn=deny,resourcecontrol=deny`);
//! * in a cgroup of its own with a memory limit (guest RAM +
//!   [`ConfineConfig::memory_overhead_mib`]), a pids limit
//!   ([`PIDS_BASE`] + one per vCPU) and a CPU quota of one CPU per vCPU
//!   ([`cgroup`]), removed when the VMM is gone.
//!
//! What it cannot open itself the daemon opens and passes: the TAP
//! (`-netdev tap,fd=N`), the QMP listening socket (`-chardev socket,fd=N`),
//! snapshot state files (QMP `getfd`, as before), and its console goes to
//! a pipe the daemon reads (see `process::console`).
//!
//! A confined Firecracker gets the same user, namespace and cgroup —
//! what Firecracker's own `jailer` does (chroot, uid/gid drop, cgroup) —
//! with Firecracker's built-in seccomp filters (never `--no-seccomp`).
//! It opens its devices and TAP itself, so its jail has its own
//! `/dev/kvm` and `/dev/net/tun` nodes owned by the VMM user
//! ([`jail::DevNode`]) and the daemon makes the VM's TAP the VMM user's
//! ([`set_tap_owner`]) for as long as the VMM runs; its API socket lives in
//! a directory of the work dir the VMM user owns (see `firecracker`).

pub mod cgroup;
pub mod jail;

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Result, VmmError};
use crate::select::EngineKind;
use crate::spec::VmSpec;
use cgroup::{CgroupHost, Limits, VmCgroup};
use jail::{Bind, DevNode, JailPlan};

/// Tasks a VMM may have besides one per vCPU: QEMU's block thread pool
/// (up to 64 workers), its main, RCU and I/O threads, with room to spare.
pub const PIDS_BASE: u32 = 128;
/// QEMU's TCG translation cache when confined, MiB (its default is 1 GiB
/// of anonymous memory, which would dwarf the memory limit).
pub const TCG_TB_MIB: u32 = 128;
/// How long a VMM's cgroup may take to empty after the VMM is reaped.
pub const CGROUP_REMOVE_WITHIN: Duration = Duration::from_secs(5);

/// How VMMs are confined (daemon config `[confinement]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfineConfig {
    /// Confine VMMs (on by default; off only for hosts where it cannot
    /// work: no mount namespaces, no cgroup controllers, not root).
    pub enabled: bool,
    /// The unprivileged user VMMs run as (created if missing).
    pub user: String,
    /// The cgroup (in each hierarchy) under which every VM gets its own.
    pub cgroup_parent: String,
    /// Memory a VMM may use beyond guest RAM, MiB: QEMU's own heap,
    /// device state, thread stacks, page cache of the kernel and images it
    /// reads, and (TCG) its [`TCG_TB_MIB`] translation cache.
    pub memory_overhead_mib: u32,
    /// An empty directory the jail's tmpfs is mounted on (inside each
    /// VMM's own namespace only; the host sees it empty).
    pub jail_dir: PathBuf,
}

impl Default for ConfineConfig {
    fn default() -> Self {
        ConfineConfig {
            enabled: true,
            user: "bhatti-vmm".into(),
            cgroup_parent: "bhatti".into(),
            memory_overhead_mib: 320,
            jail_dir: "/run/bhatti/jail".into(),
        }
    }
}

/// Whether VMMs are confined, and why not.
#[derive(Debug, Clone)]
pub enum ConfineState {
    /// Turned off in the configuration.
    Off,
    /// Asked for, but this engine cannot be confined (the fake engine,
    /// whose VMs are no processes).
    Unsupported {
        /// The engine.
        engine: EngineKind,
    },
    /// On.
    On(Arc<Confinement>),
}

impl ConfineState {
    /// The confinement, when on.
    pub fn confinement(&self) -> Option<&Arc<Confinement>> {
        match self {
            ConfineState::On(c) => Some(c),
            ConfineState::Off | ConfineState::Unsupported { .. } => None,
        }
    }
}

impl fmt::Display for ConfineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfineState::Off => f.write_str("VMM confinement off (configuration)"),
            ConfineState::Unsupported { engine } => {
                write!(f, "VMM confinement off: not implemented for {engine}")
            }
            ConfineState::On(c) => write!(
                f,
                "VMM confinement on (user {} uid {}, own mount namespace, seccomp, {})",
                c.user, c.uid, c.cgroups
            ),
        }
    }
}

/// The host side of confinement, set up once at daemon start.
#[derive(Debug)]
pub struct Confinement {
    /// The VMM user.
    pub user: String,
    /// Its uid (never 0).
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    cgroups: CgroupHost,
    parent: String,
    overhead_mib: u32,
    jail_dir: PathBuf,
}

fn confine_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Confine { what, source }
}

/// `(uid, gid)` of `user` from `getent passwd`.
fn lookup_user(user: &str) -> io::Result<Option<(u32, u32)>> {
    let out = std::process::Command::new("getent")
        .args(["passwd", user])
        .output()?;
    if !out.status.success() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = line.trim().split(':').collect();
    match (f.get(2).map(|s| s.parse()), f.get(3).map(|s| s.parse())) {
        (Some(Ok(uid)), Some(Ok(gid))) => Ok(Some((uid, gid))),
        _ => Err(io::Error::other(format!(
            "unreadable passwd entry {line:?}"
        ))),
    }
}

/// The VMM user, created (`useradd --system`, no home, no shell) if
/// missing.
pub fn ensure_user(user: &str) -> Result<(u32, u32)> {
    let valid = !user.is_empty()
        && user.len() <= 32
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !user.starts_with('-');
    if !valid {
        return Err(VmmError::InvalidSpec {
            field: "confinement.user".into(),
            reason: format!("{user:?}: use 1-32 of [a-z0-9_-]"),
        });
    }
    let found = lookup_user(user).map_err(confine_err(format!("looking up user {user}")))?;
    let (uid, gid) = match found {
        Some(ids) => ids,
        None => {
            tracing::info!(user, "creating the VMM user");
            let out = std::process::Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--user-group",
                    user,
                ])
                .output()
                .map_err(confine_err(format!("running useradd for {user}")))?;
            // A concurrent start may have created it first.
            match lookup_user(user).map_err(confine_err(format!("looking up user {user}")))? {
                Some(ids) => ids,
                None => {
                    return Err(VmmError::Confine {
                        what: format!("creating user {user}"),
                        source: io::Error::other(
                            String::from_utf8_lossy(&out.stderr).trim().to_string(),
                        ),
                    })
                }
            }
        }
    };
    if uid == 0 || gid == 0 {
        return Err(VmmError::Confine {
            what: format!("user {user}"),
            source: io::Error::other("has uid or gid 0: VMMs must not run as root"),
        });
    }
    Ok((uid, gid))
}

impl Confinement {
    /// Sets confinement up for `engine` (user, cgroup parent, jail mount
    /// point; removes empty cgroups an earlier daemon left), or says why it
    /// is off.
    pub fn prepare(config: &ConfineConfig, engine: EngineKind) -> Result<ConfineState> {
        if !config.enabled {
            return Ok(ConfineState::Off);
        }
        match engine {
            EngineKind::QemuKvm | EngineKind::QemuTcg | EngineKind::Firecracker => {}
            EngineKind::Fake => return Ok(ConfineState::Unsupported { engine }),
        }
        if config.cgroup_parent.is_empty()
            || config.cgroup_parent.contains('/')
            || config.cgroup_parent.starts_with('.')
        {
            return Err(VmmError::InvalidSpec {
                field: "confinement.cgroup_parent".into(),
                reason: format!("{:?}: one path component", config.cgroup_parent),
            });
        }
        let (uid, gid) = ensure_user(&config.user)?;
        let cgroups = CgroupHost::detect().ok_or_else(|| VmmError::Confine {
            what: "finding cgroup controllers".into(),
            source: io::Error::other(
                "neither a cgroup v2 hierarchy with memory, pids and cpu nor v1 memory, cpu and pids hierarchies are mounted",
            ),
        })?;
        cgroups
            .prepare_parent(&config.cgroup_parent)
            .map_err(|e| VmmError::Confine {
                what: format!("creating cgroup {}", config.cgroup_parent),
                source: io::Error::other(e.to_string()),
            })?;
        let swept = cgroups.sweep(&config.cgroup_parent);
        if swept > 0 {
            tracing::info!(swept, "removed empty VMM cgroups left by an earlier daemon");
        }
        std::fs::create_dir_all(&config.jail_dir).map_err(confine_err(format!(
            "creating {}",
            config.jail_dir.display()
        )))?;
        std::fs::set_permissions(&config.jail_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(confine_err(format!("chmod {}", config.jail_dir.display())))?;
        Ok(ConfineState::On(Arc::new(Confinement {
            user: config.user.clone(),
            uid,
            gid,
            cgroups,
            parent: config.cgroup_parent.clone(),
            overhead_mib: config.memory_overhead_mib,
            jail_dir: config.jail_dir.clone(),
        })))
    }

    /// A confinement that was never prepared (unit tests of what it
    /// changes in a command line).
    #[cfg(test)]
    pub(crate) fn for_tests() -> Confinement {
        Confinement {
            user: "bhatti-vmm".into(),
            uid: 999,
            gid: 999,
            cgroups: CgroupHost::V2 {
                root: "/nonexistent".into(),
            },
            parent: "bhatti".into(),
            overhead_mib: 320,
            jail_dir: "/nonexistent".into(),
        }
    }

    /// Where the controllers are.
    pub fn cgroups(&self) -> &CgroupHost {
        &self.cgroups
    }

    /// The limits of a VM with `spec`.
    pub fn limits(&self, spec: &VmSpec) -> Limits {
        Limits {
            memory_bytes: (u64::from(spec.memory_mib) + u64::from(self.overhead_mib)) << 20,
            pids: PIDS_BASE + spec.vcpus,
            cpus: spec.vcpus,
        }
    }

    /// The cgroup of the VM whose work directory is `work_dir`: its last
    /// component (the sandbox id) and a hash of the whole path, so a
    /// restarted daemon finds the same one.
    pub fn cgroup_name(work_dir: &Path) -> String {
        use std::os::unix::ffi::OsStrExt;
        let base: String = work_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        // FNV-1a: stable across runs and builds.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in work_dir.as_os_str().as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{base}-{:08x}", h as u32)
    }

    /// The cgroup of the VM in `work_dir` (not created).
    pub fn cgroup_of(&self, work_dir: &Path) -> VmCgroup {
        self.cgroups
            .existing(&self.parent, &Self::cgroup_name(work_dir))
    }

    /// Everything a confined launch of `spec` needs, made now in the
    /// daemon: the VM's files owned by the VMM user, its cgroup with its
    /// limits, the jail plan. `extra` are host paths the VMM also needs
    /// (device nodes, a binary outside `/usr`); `nodes` are device nodes
    /// made in the jail for the VMM user.
    pub(crate) fn for_vm(
        &self,
        spec: &VmSpec,
        extra: &[Bind],
        nodes: &[DevNode],
    ) -> Result<VmConfinement> {
        let mut binds: Vec<Bind> = Vec::new();
        let mut file = |path: &Path, read_only: bool, own: bool| -> Result<()> {
            if own {
                self.own(path)?;
            } else {
                self.check_access(path, read_only)?;
            }
            binds.push(Bind {
                path: path.to_path_buf(),
                dir: false,
                read_only,
            });
            Ok(())
        };
        let owned = |p: &Path| p.starts_with(&spec.work_dir);
        file(&spec.kernel, true, false)?;
        if let Some(initrd) = &spec.initrd {
            file(initrd, true, false)?;
        }
        for d in &spec.drives {
            let volume = d.id.starts_with(crate::spec::VOLUME_DRIVE_PREFIX);
            file(&d.path, d.read_only, volume || owned(&d.path))?;
        }
        if let Some(mem) = spec.memory.file() {
            if !mem.exists() {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(mem)
                    .map_err(confine_err(format!("creating {}", mem.display())))?;
            }
            file(mem, false, owned(mem))?;
        }
        if let crate::spec::MemoryBacking::Private { path } = &spec.memory {
            // QEMU 7 opens a private memory file read-write (it never
            // writes it through the mapping); the image is the capture's,
            // made for the VMM user.
            file(path, false, true)?;
        }
        binds.extend(extra.iter().cloned());
        let cgroup = self
            .cgroups
            .create(
                &self.parent,
                &Self::cgroup_name(&spec.work_dir),
                self.limits(spec),
            )
            .map_err(|e| VmmError::Confine {
                what: "creating the VM's cgroup".into(),
                source: io::Error::other(e.to_string()),
            })?;
        let plan = JailPlan::with_nodes(&self.jail_dir, &binds, nodes, (self.uid, self.gid))
            .map_err(confine_err("planning the VMM's mount namespace"))?;
        Ok(VmConfinement {
            cgroup,
            plan,
            uid: self.uid,
            gid: self.gid,
            groups: Vec::new(),
            keep_fds: Vec::new(),
        })
    }

    /// Makes a directory of the sandbox the VMM user's, mode 0700 (a
    /// directory the VMM creates files in: Firecracker's API socket).
    pub(crate) fn own_dir(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .map_err(confine_err(format!("chown {}", path.display())))?;
        let meta = std::fs::symlink_metadata(path)
            .map_err(confine_err(format!("stat {}", path.display())))?;
        if !meta.is_dir() {
            return Err(VmmError::Confine {
                what: format!("{}", path.display()),
                source: io::Error::other("is not a directory"),
            });
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(confine_err(format!("chmod {}", path.display())))
    }

    /// Makes a file of the sandbox the VMM user's, mode 0600.
    pub(crate) fn own(&self, path: &Path) -> Result<()> {
        // Never follow a link planted in a sandbox directory.
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .map_err(confine_err(format!("chown {}", path.display())))?;
        let meta = std::fs::symlink_metadata(path)
            .map_err(confine_err(format!("stat {}", path.display())))?;
        if !meta.is_file() {
            return Err(VmmError::Confine {
                what: format!("{}", path.display()),
                source: io::Error::other("is not a regular file"),
            });
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(confine_err(format!("chmod {}", path.display())))
    }

    /// A shared file (image, kernel) the VMM user must be able to read
    /// (and write, unless `read_only`) by its mode bits.
    fn check_access(&self, path: &Path, read_only: bool) -> Result<()> {
        let m = std::fs::metadata(path).map_err(confine_err(format!("stat {}", path.display())))?;
        let mode = m.mode();
        let (r, w) = if m.uid() == self.uid {
            (0o400, 0o200)
        } else if m.gid() == self.gid {
            (0o040, 0o020)
        } else {
            (0o004, 0o002)
        };
        if mode & r == 0 || (!read_only && mode & w == 0) {
            return Err(VmmError::Confine {
                what: format!("{}", path.display()),
                source: io::Error::other(format!(
                    "is not {} by user {} (mode {:o}); image files must be world-readable",
                    if read_only { "readable" } else { "writable" },
                    self.user,
                    mode & 0o7777
                )),
            });
        }
        Ok(())
    }
}

/// One confined launch, prepared in the daemon and applied in the child
/// between fork and exec.
#[derive(Debug)]
pub(crate) struct VmConfinement {
    pub(crate) cgroup: VmCgroup,
    plan: JailPlan,
    uid: u32,
    gid: u32,
    /// Supplementary groups (the group of `/dev/kvm` under KVM).
    groups: Vec<libc::gid_t>,
    /// Descriptors the VMM inherits (their close-on-exec flag is cleared in
    /// the child only).
    keep_fds: Vec<RawFd>,
}

impl VmConfinement {
    /// Gives the VMM access to a device node through its group (`/dev/kvm`
    /// is `root:kvm 0660` on most hosts): adds that group, or fails if the
    /// node is not group-accessible.
    pub(crate) fn allow_device(&mut self, dev: &Path) -> Result<()> {
        let m = std::fs::metadata(dev).map_err(confine_err(format!("stat {}", dev.display())))?;
        if m.mode() & 0o060 != 0o060 || m.gid() == 0 {
            return Err(VmmError::Confine {
                what: format!("{}", dev.display()),
                source: io::Error::other(format!(
                    "mode {:o} group {}: a confined VMM needs it readable and writable by a non-root group",
                    m.mode() & 0o7777,
                    m.gid()
                )),
            });
        }
        self.groups.push(m.gid());
        Ok(())
    }

    /// Lets the VMM inherit `fd` (which must stay open until the spawn).
    pub(crate) fn keep_fd(&mut self, fd: RawFd) {
        self.keep_fds.push(fd);
    }

    /// In the child: join the cgroup, enter the jail, drop to the VMM user,
    /// umask 077. Async-signal-safe.
    pub(crate) fn apply_in_child(&self) -> io::Result<()> {
        self.cgroup.join_self()?;
        self.plan.enter()?;
        // SAFETY: plain system calls on integers.
        unsafe {
            for &fd in &self.keep_fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) < 0
                || libc::setresgid(self.gid, self.gid, self.gid) < 0
                || libc::setresuid(self.uid, self.uid, self.uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            // What the VMM creates itself (Firecracker's API socket and
            // snapshot files) is its user's alone.
            libc::umask(0o077);
        }
        Ok(())
    }
}

/// `binary` as an absolute path (searched on `PATH` if bare).
pub(crate) fn which(binary: &Path) -> PathBuf {
    if binary.is_absolute() {
        return binary.to_path_buf();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .unwrap_or_else(|| binary.to_path_buf())
}

/// Makes user `uid` the owner of the persistent TAP `name` (`TUNSETOWNER`,
/// what `ip tuntap add … user UID` sets at creation): a process of that
/// user may then attach to it by name without `CAP_NET_ADMIN`, as a
/// confined Firecracker does. Fails (`EBUSY`) while a process is attached.
pub fn set_tap_owner(name: &str, uid: u32) -> Result<()> {
    let tap = open_tap(name)?;
    // SAFETY: TUNSETOWNER takes the uid as the integer argument; fd is open.
    if unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETOWNER, libc::c_ulong::from(uid)) } < 0 {
        return Err(confine_err(format!(
            "making user {uid} the owner of TAP {name}"
        ))(io::Error::last_os_error()));
    }
    Ok(())
}

/// Opens the persistent TAP `name` for a VMM to inherit (`-netdev
/// tap,fd=N`), with the virtio-net header QEMU would ask for itself.
pub fn open_tap(name: &str) -> Result<OwnedFd> {
    let what = || format!("opening TAP {name}");
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(VmmError::Confine {
            what: what(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"),
        });
    }
    // SAFETY: open(2) on a static path; the fd is owned right away.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(confine_err(what())(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads the ifreq we pass; fd is open.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &ifr) } < 0 {
        return Err(confine_err(what())(io::Error::last_os_error()));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_names_are_stable_and_safe() {
        let a = Confinement::cgroup_name(Path::new("/var/lib/bhatti/sandboxes/sb-0123456789ab"));
        assert!(a.starts_with("sb-0123456789ab-"), "{a}");
        assert_eq!(
            a,
            Confinement::cgroup_name(Path::new("/var/lib/bhatti/sandboxes/sb-0123456789ab"))
        );
        assert_ne!(
            a,
            Confinement::cgroup_name(Path::new("/tmp/other/sandboxes/sb-0123456789ab"))
        );
        let b = Confinement::cgroup_name(Path::new("/x/a b..c"));
        assert!(b.starts_with("a_b__c-"), "{b}");
    }

    #[test]
    fn bad_user_names_are_refused() {
        for u in ["", "root;rm", "-x", "A", &"a".repeat(33)] {
            assert!(ensure_user(u).is_err(), "{u:?}");
        }
    }

    #[test]
    fn state_lines_say_on_or_why_not() {
        assert!(ConfineState::Off.to_string().contains("off"));
        let s = ConfineState::Unsupported {
            engine: EngineKind::Fake,
        }
        .to_string();
        assert!(s.contains("off") && s.contains("fake"), "{s}");
    }
}
