//! Engine selection: which VMM to run on this host, and why.
//!
//! Firecracker if its binary and a hardware KVM exist; else QEMU+KVM if KVM
//! runs standard guests; else QEMU+TCG. Guests of another architecture than
//! the host's (arm64 on x86_64) run only on QEMU+TCG. A host whose `/dev/kvm` comes from
//! `kvm_pvm` alone (a pagetable-based nested KVM with no VMX/SVM) does not run
//! standard guests: a stock kernel crawls and hangs there. An explicit
//! preference that the host cannot satisfy is an error, never a fallback.
//!
//! Detection reads paths from a [`HostProbe`], so tests can fake a host.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, VmmError};

/// Environment variable naming the Firecracker binary.
pub const FIRECRACKER_ENV: &str = "BHATTI_FIRECRACKER";
/// Environment variable naming the QEMU binary for amd64 guests.
pub const QEMU_ENV: &str = "BHATTI_QEMU";
/// Environment variable naming the QEMU binary for arm64 guests.
pub const QEMU_ARM64_ENV: &str = "BHATTI_QEMU_ARM64";
/// The QEMU binary for amd64 guests looked up on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// The QEMU binary for arm64 guests looked up on `PATH`.
pub const QEMU_ARM64_BINARY: &str = "qemu-system-aarch64";

pub use proto::Arch;

/// The QEMU binary name and its environment variable for `arch` guests.
pub fn qemu_binary(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::Amd64 => (QEMU_BINARY, QEMU_ENV),
        Arch::Arm64 => (QEMU_ARM64_BINARY, QEMU_ARM64_ENV),
    }
}
/// The Firecracker binary looked up on `PATH`.
pub const FIRECRACKER_BINARY: &str = "firecracker";

/// A concrete engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EngineKind {
    /// Firecracker on hardware KVM.
    Firecracker,
    /// QEMU with `-accel kvm`.
    QemuKvm,
    /// QEMU with `-accel tcg` (software emulation).
    QemuTcg,
    /// The test engine (`vmm::fake`, feature `fake`): the "guest" is a `lohar serve`
    /// process on the host. Never chosen by [`select_engine`].
    Fake,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Firecracker => "firecracker",
            EngineKind::QemuKvm => "qemu-kvm",
            EngineKind::QemuTcg => "qemu-tcg",
            EngineKind::Fake => "fake",
        })
    }
}

/// What the operator asked for (`engine = "auto"` by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnginePreference {
    /// The best engine this host supports.
    #[default]
    Auto,
    /// Firecracker, or an error.
    Firecracker,
    /// QEMU with KVM, or an error.
    QemuKvm,
    /// QEMU with TCG, or an error.
    QemuTcg,
}

impl fmt::Display for EnginePreference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EnginePreference::Auto => "auto",
            EnginePreference::Firecracker => "firecracker",
            EnginePreference::QemuKvm => "qemu-kvm",
            EnginePreference::QemuTcg => "qemu-tcg",
        })
    }
}

impl std::str::FromStr for EnginePreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "firecracker" => Ok(Self::Firecracker),
            "qemu-kvm" => Ok(Self::QemuKvm),
            "qemu-tcg" => Ok(Self::QemuTcg),
            other => Err(format!(
                "unknown engine {other:?} (auto, firecracker, qemu-kvm, qemu-tcg)"
            )),
        }
    }
}

/// The engine picked, its binary, and the reason, for logs and `bhatti info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineChoice {
    /// The engine.
    pub kind: EngineKind,
    /// The guests' architecture.
    pub arch: Arch,
    /// Its binary.
    pub binary: PathBuf,
    /// Why this engine, in a sentence.
    pub reason: String,
}

/// What KVM on this host can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmSupport {
    /// Hardware virtualisation through this module (`kvm_intel`, `kvm_amd`,
    /// or `vmx`/`svm` with KVM built in).
    Hardware(String),
    /// `/dev/kvm` exists but cannot run standard guests.
    PvmOnly,
    /// No usable `/dev/kvm`, with the reason.
    Unavailable(String),
}

/// The host facts selection depends on, as paths and values, so a test can
/// point them at a temporary directory.
#[derive(Debug, Clone)]
pub struct HostProbe {
    /// `/sys/module`.
    pub sys_module: PathBuf,
    /// `/dev/kvm`.
    pub dev_kvm: PathBuf,
    /// `/proc/cpuinfo`.
    pub cpuinfo: PathBuf,
    /// `$PATH`.
    pub path_var: Option<OsString>,
    /// `$BHATTI_FIRECRACKER`.
    pub firecracker_env: Option<OsString>,
    /// `$BHATTI_QEMU`.
    pub qemu_env: Option<OsString>,
    /// `$BHATTI_QEMU_ARM64`.
    pub qemu_arm64_env: Option<OsString>,
    /// The host's architecture (`None`: neither amd64 nor arm64).
    pub arch: Option<Arch>,
}

impl HostProbe {
    /// The real host.
    pub fn host() -> Self {
        HostProbe {
            sys_module: "/sys/module".into(),
            dev_kvm: "/dev/kvm".into(),
            cpuinfo: "/proc/cpuinfo".into(),
            path_var: std::env::var_os("PATH"),
            firecracker_env: std::env::var_os(FIRECRACKER_ENV).filter(|v| !v.is_empty()),
            qemu_env: std::env::var_os(QEMU_ENV).filter(|v| !v.is_empty()),
            qemu_arm64_env: std::env::var_os(QEMU_ARM64_ENV).filter(|v| !v.is_empty()),
            arch: Arch::host(),
        }
    }

    /// What KVM here can run.
    pub fn kvm(&self) -> KvmSupport {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.dev_kvm)
        {
            return KvmSupport::Unavailable(format!(
                "{} cannot be opened: {e}",
                self.dev_kvm.display()
            ));
        }
        let module = |m: &str| self.sys_module.join(m).exists();
        for vendor in ["kvm_intel", "kvm_amd"] {
            if module(vendor) {
                return KvmSupport::Hardware(vendor.into());
            }
        }
        if module("kvm_pvm") {
            return KvmSupport::PvmOnly;
        }
        // arm64 KVM is built in and has no vendor module or CPU flag in
        // /proc/cpuinfo: a /dev/kvm that opens is it.
        if self.arch == Some(Arch::Arm64) {
            return KvmSupport::Hardware("arm64 kvm".into());
        }
        // KVM built into the kernel leaves no vendor module directory; the
        // CPU flags still tell whether the hardware can do it.
        let flags = std::fs::read_to_string(&self.cpuinfo).unwrap_or_default();
        let has = |f: &str| {
            flags
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|w| w == f))
        };
        if has("vmx") {
            KvmSupport::Hardware("vmx".into())
        } else if has("svm") {
            KvmSupport::Hardware("svm".into())
        } else {
            KvmSupport::Unavailable(format!(
                "{} opens but no kvm_intel/kvm_amd module and no vmx/svm CPU flag",
                self.dev_kvm.display()
            ))
        }
    }

    /// The Firecracker binary: `$BHATTI_FIRECRACKER`, else `firecracker` on
    /// `PATH`. `Err` says where we looked.
    pub fn firecracker(&self) -> Result<PathBuf, String> {
        self.binary(
            FIRECRACKER_ENV,
            self.firecracker_env.as_ref(),
            FIRECRACKER_BINARY,
        )
    }

    /// The QEMU binary for `arch` guests: `$BHATTI_QEMU`, else
    /// `qemu-system-x86_64` on `PATH` (amd64); `$BHATTI_QEMU_ARM64`, else
    /// `qemu-system-aarch64` (arm64).
    pub fn qemu(&self, arch: Arch) -> Result<PathBuf, String> {
        let (name, env) = qemu_binary(arch);
        let set = match arch {
            Arch::Amd64 => self.qemu_env.as_ref(),
            Arch::Arm64 => self.qemu_arm64_env.as_ref(),
        };
        self.binary(env, set, name)
    }

    fn binary(&self, env: &str, set: Option<&OsString>, name: &str) -> Result<PathBuf, String> {
        if let Some(p) = set {
            let p = PathBuf::from(p);
            return if is_executable(&p) {
                Ok(p)
            } else {
                Err(format!("{env}={} is not an executable file", p.display()))
            };
        }
        let path = self.path_var.clone().unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
            .ok_or_else(|| format!("{name} not found ({env} unset, not on PATH)"))
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Picks the engine for `pref` and `arch` guests on this host.
pub fn select_engine(pref: EnginePreference, arch: Arch) -> Result<EngineChoice> {
    select_engine_with(pref, arch, &HostProbe::host())
}

/// Picks the engine for `pref` and `arch` guests on the host described by
/// `probe`. Guests of a foreign architecture run only on QEMU+TCG.
pub fn select_engine_with(
    pref: EnginePreference,
    arch: Arch,
    probe: &HostProbe,
) -> Result<EngineChoice> {
    let foreign = probe.arch != Some(arch);
    let kvm = if foreign {
        KvmSupport::Unavailable(format!(
            "{arch} guests on an {} host run only emulated",
            probe.arch.map_or("other", Arch::name)
        ))
    } else {
        probe.kvm()
    };
    let kvm_text = match &kvm {
        KvmSupport::Hardware(how) => format!("hardware KVM ({how})"),
        KvmSupport::PvmOnly => {
            "KVM is kvm_pvm only (no kvm_intel/kvm_amd): it cannot run standard guests".into()
        }
        KvmSupport::Unavailable(why) => format!("no KVM: {why}"),
    };
    let hw = matches!(kvm, KvmSupport::Hardware(_));
    let unavailable = |reason: String| VmmError::EngineUnavailable {
        preference: pref,
        reason,
    };
    let choice = |kind, binary: PathBuf, reason: String| EngineChoice {
        kind,
        arch,
        binary,
        reason,
    };

    let firecracker = || -> Result<EngineChoice, String> {
        if foreign {
            return Err(kvm_text.clone());
        }
        let bin = probe.firecracker()?;
        if !hw {
            return Err(format!("firecracker at {} but {kvm_text}", bin.display()));
        }
        let reason = format!("firecracker at {}; {kvm_text}", bin.display());
        Ok(choice(EngineKind::Firecracker, bin, reason))
    };
    let qemu_kvm = || -> Result<EngineChoice, String> {
        let bin = probe.qemu(arch)?;
        if !hw {
            return Err(kvm_text.clone());
        }
        let reason = format!("QEMU at {} with KVM; {kvm_text}", bin.display());
        Ok(choice(EngineKind::QemuKvm, bin, reason))
    };
    let qemu_tcg = || -> Result<EngineChoice, String> {
        let bin = probe.qemu(arch)?;
        let reason = format!(
            "QEMU at {} with TCG (software emulation); {kvm_text}",
            bin.display()
        );
        Ok(choice(EngineKind::QemuTcg, bin, reason))
    };

    match pref {
        EnginePreference::Firecracker => firecracker().map_err(unavailable),
        EnginePreference::QemuKvm => qemu_kvm().map_err(unavailable),
        EnginePreference::QemuTcg => qemu_tcg().map_err(unavailable),
        EnginePreference::Auto => {
            let fc_err = match firecracker() {
                Ok(c) => return Ok(with_prefix(c, "auto")),
                Err(e) => e,
            };
            let kvm_err = match qemu_kvm() {
                Ok(c) => return Ok(with_prefix(c, &format!("auto (not firecracker: {fc_err})"))),
                Err(e) => e,
            };
            match qemu_tcg() {
                Ok(c) => Ok(with_prefix(
                    c,
                    &format!("auto (not firecracker: {fc_err}; not QEMU+KVM: {kvm_err})"),
                )),
                Err(e) => Err(unavailable(format!("firecracker: {fc_err}; QEMU: {e}"))),
            }
        }
    }
}

fn with_prefix(mut c: EngineChoice, prefix: &str) -> EngineChoice {
    c.reason = format!("{prefix}: {}", c.reason);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fake host in a temp dir: `/sys/module` entries, a `/dev/kvm` that
    /// opens (a plain file) or not, binaries on a fake `PATH`.
    struct FakeHost {
        dir: tempfile::TempDir,
    }

    impl FakeHost {
        fn new(modules: &[&str], kvm_opens: bool, bins: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            for m in modules {
                std::fs::create_dir_all(d.join("sys/module").join(m)).unwrap();
            }
            std::fs::create_dir_all(d.join("sys/module")).unwrap();
            if kvm_opens {
                std::fs::write(d.join("kvm"), b"").unwrap();
            }
            std::fs::write(d.join("cpuinfo"), "flags\t\t: fpu tsc constant_tsc\n").unwrap();
            std::fs::create_dir_all(d.join("bin")).unwrap();
            for b in bins {
                let p = d.join("bin").join(b);
                std::fs::write(&p, b"#!/bin/sh\n").unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            FakeHost { dir }
        }

        fn probe(&self) -> HostProbe {
            let d = self.dir.path();
            HostProbe {
                sys_module: d.join("sys/module"),
                dev_kvm: d.join("kvm"),
                cpuinfo: d.join("cpuinfo"),
                path_var: Some(d.join("bin").into_os_string()),
                firecracker_env: None,
                qemu_env: None,
                qemu_arm64_env: None,
                arch: Some(Arch::Amd64),
            }
        }
    }

    const QEMU: &str = QEMU_BINARY;
    const QEMU_ARM64: &str = QEMU_ARM64_BINARY;

    #[test]
    fn foreign_guests_run_on_tcg_with_their_own_qemu() {
        let h = FakeHost::new(&["kvm", "kvm_intel"], true, &[FC, QEMU, QEMU_ARM64]);
        let c = select_engine_with(EnginePreference::Auto, Arch::Arm64, &h.probe()).unwrap();
        assert_eq!((c.kind, c.arch), (EngineKind::QemuTcg, Arch::Arm64));
        assert!(c.binary.ends_with(QEMU_ARM64), "{}", c.binary.display());
        assert!(
            c.reason
                .contains("arm64 guests on an amd64 host run only emulated"),
            "{}",
            c.reason
        );
        for pref in [EnginePreference::Firecracker, EnginePreference::QemuKvm] {
            let e = select_engine_with(pref, Arch::Arm64, &h.probe()).unwrap_err();
            assert!(e.to_string().contains("run only emulated"), "{e}");
        }
        // The native choice on the same host is untouched.
        let c = select_engine_with(EnginePreference::Auto, Arch::Amd64, &h.probe()).unwrap();
        assert_eq!((c.kind, c.arch), (EngineKind::Firecracker, Arch::Amd64));
        // No qemu-system-aarch64: arm64 has no engine, and says which binary.
        let h = FakeHost::new(&["kvm", "kvm_intel"], true, &[FC, QEMU]);
        let e = select_engine_with(EnginePreference::Auto, Arch::Arm64, &h.probe()).unwrap_err();
        assert!(
            e.to_string().contains("qemu-system-aarch64 not found"),
            "{e}"
        );
    }
    const FC: &str = FIRECRACKER_BINARY;

    #[test]
    fn auto_prefers_firecracker_on_hardware_kvm() {
        let h = FakeHost::new(&["kvm", "kvm_intel"], true, &[FC, QEMU]);
        let c = select_engine_with(EnginePreference::Auto, Arch::Amd64, &h.probe()).unwrap();
        assert_eq!(c.kind, EngineKind::Firecracker);
        assert!(c.binary.ends_with(FC));
        assert!(
            c.reason.contains("hardware KVM (kvm_intel)"),
            "{}",
            c.reason
        );
    }

    #[test]
    fn auto_takes_qemu_kvm_without_firecracker() {
        let h = FakeHost::new(&["kvm", "kvm_amd"], true, &[QEMU]);
        let c = select_engine_with(EnginePreference::Auto, Arch::Amd64, &h.probe()).unwrap();
        assert_eq!(c.kind, EngineKind::QemuKvm);
        assert!(c.reason.contains("firecracker not found"), "{}", c.reason);
    }

    #[test]
    fn pvm_only_host_falls_back_to_tcg_and_says_why() {
        let h = FakeHost::new(&["kvm", "kvm_pvm"], true, &[FC, QEMU]);
        let c = select_engine_with(EnginePreference::Auto, Arch::Amd64, &h.probe()).unwrap();
        assert_eq!(c.kind, EngineKind::QemuTcg);
        assert!(c.reason.contains("kvm_pvm only"), "{}", c.reason);
    }

    #[test]
    fn vendor_module_beats_pvm() {
        let h = FakeHost::new(&["kvm", "kvm_pvm", "kvm_intel"], true, &[QEMU]);
        assert_eq!(
            select_engine_with(EnginePreference::Auto, Arch::Amd64, &h.probe())
                .unwrap()
                .kind,
            EngineKind::QemuKvm
        );
    }

    #[test]
    fn kvm_module_without_device_is_not_kvm() {
        let h = FakeHost::new(&["kvm", "kvm_intel"], false, &[FC, QEMU]);
        let c = select_engine_with(EnginePreference::Auto, Arch::Amd64, &h.probe()).unwrap();
        assert_eq!(c.kind, EngineKind::QemuTcg);
        assert!(c.reason.contains("cannot be opened"), "{}", c.reason);
    }

    #[test]
    fn builtin_kvm_is_detected_from_cpu_flags() {
        let h = FakeHost::new(&["kvm"], true, &[QEMU]);
        std::fs::write(h.dir.path().join("cpuinfo"), "flags\t\t: fpu vmx tsc\n").unwrap();
        assert_eq!(h.probe().kvm(), KvmSupport::Hardware("vmx".into()));
        std::fs::write(h.dir.path().join("cpuinfo"), "flags\t\t: fpu tsc\n").unwrap();
        assert!(matches!(h.probe().kvm(), KvmSupport::Unavailable(_)));
    }

    #[test]
    fn explicit_preferences_never_fall_back() {
        let h = FakeHost::new(&["kvm", "kvm_pvm"], true, &[FC, QEMU]);
        let e =
            select_engine_with(EnginePreference::Firecracker, Arch::Amd64, &h.probe()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("engine firecracker unavailable: "),
            "{e}"
        );
        assert!(e.to_string().contains("kvm_pvm only"), "{e}");
        let e = select_engine_with(EnginePreference::QemuKvm, Arch::Amd64, &h.probe()).unwrap_err();
        assert!(e.to_string().contains("kvm_pvm only"), "{e}");
        let c = select_engine_with(EnginePreference::QemuTcg, Arch::Amd64, &h.probe()).unwrap();
        assert_eq!(c.kind, EngineKind::QemuTcg);

        let none = FakeHost::new(&["kvm", "kvm_intel"], true, &[]);
        let e =
            select_engine_with(EnginePreference::QemuTcg, Arch::Amd64, &none.probe()).unwrap_err();
        assert!(
            e.to_string().contains("qemu-system-x86_64 not found"),
            "{e}"
        );
        let e = select_engine_with(EnginePreference::Auto, Arch::Amd64, &none.probe()).unwrap_err();
        assert!(e.to_string().contains("firecracker not found"), "{e}");
    }

    #[test]
    fn env_override_must_be_executable() {
        let h = FakeHost::new(&["kvm", "kvm_intel"], true, &[QEMU]);
        let mut p = h.probe();
        p.firecracker_env = Some(h.dir.path().join("cpuinfo").into_os_string());
        let e = select_engine_with(EnginePreference::Firecracker, Arch::Amd64, &p).unwrap_err();
        assert!(e.to_string().contains("BHATTI_FIRECRACKER="), "{e}");
        p.firecracker_env = Some(h.dir.path().join("bin").join(QEMU).into_os_string());
        assert_eq!(
            select_engine_with(EnginePreference::Firecracker, Arch::Amd64, &p)
                .unwrap()
                .kind,
            EngineKind::Firecracker
        );
    }

    #[test]
    fn preference_parses() {
        for p in [
            EnginePreference::Auto,
            EnginePreference::Firecracker,
            EnginePreference::QemuKvm,
            EnginePreference::QemuTcg,
        ] {
            assert_eq!(p.to_string().parse::<EnginePreference>().unwrap(), p);
        }
        assert!("kvm".parse::<EnginePreference>().is_err());
    }

    /// The real host: whatever it is, auto picks something consistent with
    /// what the probe sees, and says why.
    #[test]
    fn real_host_selection_is_consistent() {
        let probe = HostProbe::host();
        let kvm = probe.kvm();
        eprintln!("host KVM: {kvm:?}");
        match select_engine(EnginePreference::Auto, Arch::Amd64) {
            Ok(c) => {
                eprintln!("auto → {} ({})", c.kind, c.reason);
                assert!(!c.reason.is_empty());
                match c.kind {
                    EngineKind::Firecracker | EngineKind::QemuKvm => {
                        assert!(matches!(kvm, KvmSupport::Hardware(_)))
                    }
                    EngineKind::QemuTcg => assert!(!matches!(kvm, KvmSupport::Hardware(_))),
                    EngineKind::Fake => panic!("selection chose the fake engine"),
                }
                if matches!(kvm, KvmSupport::PvmOnly) {
                    assert_eq!(c.kind, EngineKind::QemuTcg);
                }
            }
            Err(e) => {
                assert!(
                    probe.qemu(Arch::Amd64).is_err(),
                    "QEMU is installed but auto failed: {e}"
                );
            }
        }
    }
}
