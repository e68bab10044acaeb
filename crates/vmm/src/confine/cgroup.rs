//! One cgroup per VM: memory, pids and CPU limits, on cgroup v2 where the
//! host has those controllers in its unified hierarchy, else on the v1
//! `memory`, `cpu` and `pids` hierarchies.
//!
//! Every path comes from a [`CgroupHost`] whose roots are plain directories,
//! so the file writes are unit-tested against a temp dir standing for the
//! cgroup file system.

use std::ffi::CString;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A cgroup operation that failed, with the file.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {source}")]
pub struct CgroupError {
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError {
        path: path.to_path_buf(),
        source,
    }
}

/// How old an empty cgroup must be for [`CgroupHost::sweep`] to remove it.
pub const SWEEP_MIN_AGE: Duration = Duration::from_secs(60);

/// The CFS period every quota is expressed in: 10 ms, not the kernel's
/// 100 ms default — a VMM whose vCPU and I/O threads together use up the
/// quota early in a period waits for the next one, and with 100 ms that
/// wait showed as ~150 ms p95 on a warm resume + exec (bench thermal).
pub const CPU_PERIOD_US: u64 = 10_000;

/// What one VM may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory (guest RAM plus the VMM's overhead), bytes.
    pub memory_bytes: u64,
    /// Tasks (processes and threads).
    pub pids: u32,
    /// CPUs' worth of time per period (the VM's vCPUs).
    pub cpus: u32,
}

/// Where the controllers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupHost {
    /// cgroup v2: one hierarchy holding `memory`, `pids` and `cpu`.
    V2 {
        /// Its mount point.
        root: PathBuf,
    },
    /// cgroup v1: one hierarchy per controller.
    V1 {
        /// The `memory` hierarchy's mount point.
        memory: PathBuf,
        /// The `cpu` hierarchy's (often shared with `cpuacct`).
        cpu: PathBuf,
        /// The `pids` hierarchy's.
        pids: PathBuf,
    },
}

impl std::fmt::Display for CgroupHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CgroupHost::V2 { root } => write!(f, "cgroup v2 at {}", root.display()),
            CgroupHost::V1 { memory, .. } => {
                write!(f, "cgroup v1 (memory at {}, cpu, pids)", memory.display())
            }
        }
    }
}

/// One cgroup mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    v2: bool,
    options: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split(' ').nth(4);
        let mut r = right.split(' ');
        let (fstype, _source, opts) = (r.next(), r.next(), r.next());
        let (Some(point), Some(fstype)) = (point, fstype) else {
            continue;
        };
        let v2 = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        // Mount points escape spaces as \040.
        let point = PathBuf::from(point.replace("\\040", " "));
        out.push(Mount {
            point,
            v2,
            options: opts.unwrap_or("").split(',').map(str::to_string).collect(),
        });
    }
    out
}

const NEEDED: [&str; 3] = ["memory", "pids", "cpu"];

impl CgroupHost {
    /// Finds the controllers from `/proc/self/mountinfo`: a v2 hierarchy
    /// whose `cgroup.controllers` lists `memory`, `pids` and `cpu`, else v1
    /// hierarchies for each. `None` if neither.
    pub fn detect() -> Option<CgroupHost> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        Self::from_mounts(&parse_mountinfo(&text))
    }

    fn from_mounts(mounts: &[Mount]) -> Option<CgroupHost> {
        for m in mounts.iter().filter(|m| m.v2) {
            let have =
                std::fs::read_to_string(m.point.join("cgroup.controllers")).unwrap_or_default();
            let have: Vec<&str> = have.split_whitespace().collect();
            if NEEDED.iter().all(|c| have.contains(c)) {
                return Some(CgroupHost::V2 {
                    root: m.point.clone(),
                });
            }
        }
        let v1 = |c: &str| {
            mounts
                .iter()
                .find(|m| !m.v2 && m.options.iter().any(|o| o == c))
                .map(|m| m.point.clone())
        };
        Some(CgroupHost::V1 {
            memory: v1("memory")?,
            cpu: v1("cpu")?,
            pids: v1("pids")?,
        })
    }

    /// The directories of cgroup `parent/name`, one per hierarchy.
    fn dirs(&self, parent: &str, name: &str) -> Vec<PathBuf> {
        match self {
            CgroupHost::V2 { root } => vec![root.join(parent).join(name)],
            CgroupHost::V1 { memory, cpu, pids } => vec![
                memory.join(parent).join(name),
                cpu.join(parent).join(name),
                pids.join(parent).join(name),
            ],
        }
    }

    /// Creates `parent` (v2: with the controllers delegated to its
    /// children) — once, at daemon start.
    pub fn prepare_parent(&self, parent: &str) -> Result<(), CgroupError> {
        match self {
            CgroupHost::V2 { root } => {
                // The root must hand the controllers down to `parent`, and
                // `parent` to the VMs' cgroups.
                enable_controllers(root)?;
                let p = root.join(parent);
                mkdir(&p)?;
                enable_controllers(&p)
            }
            CgroupHost::V1 { memory, cpu, pids } => {
                for root in [memory, cpu, pids] {
                    mkdir(&root.join(parent))?;
                }
                Ok(())
            }
        }
    }

    /// Removes every empty cgroup under `parent` (those of VMMs that died
    /// with an earlier daemon) older than [`SWEEP_MIN_AGE`] (a younger one
    /// may be another manager's, made for a VMM about to join it). A
    /// cgroup with a live VMM stays (the kernel refuses with EBUSY).
    /// Returns how many were removed.
    pub fn sweep(&self, parent: &str) -> usize {
        let roots: Vec<PathBuf> = match self {
            CgroupHost::V2 { root } => vec![root.join(parent)],
            CgroupHost::V1 { memory, cpu, pids } => {
                vec![memory.join(parent), cpu.join(parent), pids.join(parent)]
            }
        };
        let mut n = 0;
        for r in roots {
            let Ok(entries) = std::fs::read_dir(&r) else {
                continue;
            };
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= SWEEP_MIN_AGE);
                if old
                    && e.file_type().map(|t| t.is_dir()).unwrap_or(false)
                    && std::fs::remove_dir(e.path()).is_ok()
                {
                    n += 1;
                }
            }
        }
        n
    }

    /// Creates (or reuses) the cgroup `parent/name` and writes `limits`.
    pub fn create(
        &self,
        parent: &str,
        name: &str,
        limits: Limits,
    ) -> Result<VmCgroup, CgroupError> {
        let dirs = self.dirs(parent, name);
        for d in &dirs {
            mkdir(d)?;
        }
        let cg = VmCgroup {
            dirs: dirs.clone(),
            procs: dirs
                .iter()
                .map(|d| {
                    CString::new(d.join("cgroup.procs").as_os_str().as_bytes())
                        .map_err(|e| err(d)(std::io::Error::other(e)))
                })
                .collect::<Result<_, _>>()?,
        };
        let quota = u64::from(limits.cpus) * CPU_PERIOD_US;
        match self {
            CgroupHost::V2 { .. } => {
                let d = &dirs[0];
                write(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
                // No swap: the limit is the limit (absent without swap
                // accounting).
                write_if_present(&d.join("memory.swap.max"), "0")?;
                write(&d.join("pids.max"), &limits.pids.to_string())?;
                write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            CgroupHost::V1 { .. } => {
                let (mem, cpu, pids) = (&dirs[0], &dirs[1], &dirs[2]);
                let bytes = limits.memory_bytes.to_string();
                // memsw must stay ≥ the memory limit: raise the memory limit
                // first when lowering is not the case, set memsw after.
                write(&mem.join("memory.limit_in_bytes"), &bytes)?;
                write_if_present(&mem.join("memory.memsw.limit_in_bytes"), &bytes)?;
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&pids.join("pids.max"), &limits.pids.to_string())?;
            }
        }
        Ok(cg)
    }

    /// The cgroup `parent/name` as a handle (for removing what an earlier
    /// daemon made), without touching it.
    pub fn existing(&self, parent: &str, name: &str) -> VmCgroup {
        let dirs = self.dirs(parent, name);
        VmCgroup {
            procs: dirs
                .iter()
                .filter_map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).ok())
                .collect(),
            dirs,
        }
    }
}

fn mkdir(p: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(p)(e)),
    }
}

fn write(p: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(p, value).map_err(err(p))
}

fn write_if_present(p: &Path, value: &str) -> Result<(), CgroupError> {
    if p.exists() {
        write(p, value)
    } else {
        Ok(())
    }
}

/// `+memory +pids +cpu` in `dir/cgroup.subtree_control`, unless there.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let have = std::fs::read_to_string(&file).unwrap_or_default();
    let have: Vec<&str> = have.split_whitespace().collect();
    let missing: Vec<String> = NEEDED
        .iter()
        .filter(|c| !have.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&file, &missing.join(" "))
}

/// One VM's cgroup (a directory per hierarchy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each, for the child to join before exec.
    procs: Vec<CString>,
}

impl VmCgroup {
    /// The directories (v2: one; v1: memory, cpu, pids).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves the calling process into the cgroup. Async-signal-safe (only
    /// `open`, `write`, `close`): called between fork and exec.
    pub(crate) fn join_self(&self) -> std::io::Result<()> {
        for p in &self.procs {
            // SAFETY: open/write/close on a NUL-terminated path we own; no
            // allocation, so this is fine between fork and exec.
            unsafe {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                if rc < 0 {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Removes the cgroup. Its processes must be gone: an exited VMM's
    /// cgroup can take a moment to empty, so this retries until `within`.
    /// A missing directory counts as removed.
    pub fn remove(&self, within: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + within;
        for d in &self.dirs {
            loop {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if Instant::now() < deadline => {
                        tracing::trace!(dir = %d.display(), error = %e, "cgroup not empty yet");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(err(d)(e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        memory_bytes: 512 << 20,
        pids: 130,
        cpus: 2,
    };

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn v2_writes_memory_pids_and_cpu_max() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().to_path_buf();
        // What the kernel shows at the root: controllers available, none
        // delegated yet.
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids").unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let host = CgroupHost::from_mounts(&[Mount {
            point: root.clone(),
            v2: true,
            options: vec!["rw".into()],
        }])
        .unwrap();
        assert_eq!(host, CgroupHost::V2 { root: root.clone() });
        host.prepare_parent("bhatti").unwrap();
        assert_eq!(
            read(&root.join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(
            read(&root.join("bhatti/cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        let cg = host.create("bhatti", "vm1", LIMITS).unwrap();
        let vm = root.join("bhatti/vm1");
        assert_eq!(cg.dirs(), std::slice::from_ref(&vm));
        assert_eq!(read(&vm.join("memory.max")), (512u64 << 20).to_string());
        assert_eq!(read(&vm.join("pids.max")), "130");
        assert_eq!(read(&vm.join("cpu.max")), "20000 10000");
        assert!(
            !vm.join("memory.swap.max").exists(),
            "only written if present"
        );
        // A real cgroup dir is removed by rmdir even with its files; a temp
        // dir is not: remove the files as the kernel would.
        for f in ["memory.max", "pids.max", "cpu.max"] {
            std::fs::remove_file(vm.join(f)).unwrap();
        }
        cg.remove(Duration::ZERO).unwrap();
        assert!(!vm.exists());
        cg.remove(Duration::ZERO).unwrap();
    }

    #[test]
    fn v2_without_the_controllers_falls_back_to_v1() {
        let d = tempfile::tempdir().unwrap();
        let v2 = d.path().join("unified");
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "hugetlb").unwrap();
        let text = format!(
            "30 25 0:26 / {v2} rw - cgroup2 cgroup2 rw\n\
             31 25 0:27 / {d}/memory rw,relatime - cgroup cgroup rw,memory\n\
             32 25 0:28 / {d}/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             33 25 0:29 / {d}/pids rw - cgroup cgroup rw,pids\n\
             34 25 0:30 / {d}/cpuset rw - cgroup cgroup rw,cpuset\n\
             22 1 8:1 / / rw - ext4 /dev/sda1 rw\n",
            v2 = v2.display(),
            d = d.path().display()
        );
        let host = CgroupHost::from_mounts(&parse_mountinfo(&text)).unwrap();
        let CgroupHost::V1 { memory, cpu, pids } = &host else {
            panic!("{host:?}");
        };
        assert_eq!(memory, &d.path().join("memory"));
        assert_eq!(cpu, &d.path().join("cpu,cpuacct"));
        assert_eq!(pids, &d.path().join("pids"));
        for p in [memory, cpu, pids] {
            std::fs::create_dir(p).unwrap();
        }
        // memsw exists only with swap accounting.
        host.prepare_parent("bhatti").unwrap();
        std::fs::create_dir(memory.join("bhatti/vm1")).unwrap();
        std::fs::write(memory.join("bhatti/vm1/memory.memsw.limit_in_bytes"), "").unwrap();
        let cg = host.create("bhatti", "vm1", LIMITS).unwrap();
        assert_eq!(cg.dirs().len(), 3);
        let m = memory.join("bhatti/vm1");
        assert_eq!(read(&m.join("memory.limit_in_bytes")), "536870912");
        assert_eq!(read(&m.join("memory.memsw.limit_in_bytes")), "536870912");
        assert_eq!(read(&cpu.join("bhatti/vm1/cpu.cfs_quota_us")), "20000");
        assert_eq!(read(&cpu.join("bhatti/vm1/cpu.cfs_period_us")), "10000");
        assert_eq!(read(&pids.join("bhatti/vm1/pids.max")), "130");
        // Sweep removes old empty cgroups only (a temp dir with files
        // stands for a busy one).
        let empty = pids.join("bhatti/empty");
        std::fs::create_dir(&empty).unwrap();
        assert_eq!(host.sweep("bhatti"), 0, "too young");
        let old = std::time::SystemTime::now() - 2 * SWEEP_MIN_AGE;
        for d in [&empty, &pids.join("bhatti/vm1")] {
            std::fs::File::open(d).unwrap().set_modified(old).unwrap();
        }
        assert_eq!(host.sweep("bhatti"), 1);
        assert!(!empty.exists());
        assert!(pids.join("bhatti/vm1").exists());
    }

    #[test]
    fn no_controllers_means_none() {
        let text = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(CgroupHost::from_mounts(&parse_mountinfo(text)), None);
    }

    #[test]
    fn a_cgroup_that_does_not_empty_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let host = CgroupHost::V2 {
            root: d.path().to_path_buf(),
        };
        let cg = host.existing("bhatti", "busy");
        std::fs::create_dir_all(d.path().join("bhatti/busy")).unwrap();
        std::fs::write(d.path().join("bhatti/busy/cgroup.procs"), "123").unwrap();
        let e = cg.remove(Duration::from_millis(30)).unwrap_err();
        assert!(e.to_string().contains("busy"), "{e}");
    }
}
