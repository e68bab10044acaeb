//! The QEMU command line for a [`VmSpec`], as a pure function.
//!
//! A snapshot restores only into a QEMU whose devices are configured
//! identically, so the same function builds the line for boot and restore;
//! a restore adds `-S -incoming defer` and nothing else (`-S`: the
//! loaded guest stays stopped until the daemon says `cont`). Host-side paths that
//! the guest never sees (QMP socket, TAP) may differ between the two, or
//! be descriptors the daemon passes ([`Passed`], confined VMMs).

use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use super::{Accel, QemuConfig};
use crate::select::Arch;
use crate::spec::{MemoryBacking, VmSpec};

/// Name of the QMP socket inside the work directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// QOM id of the memory backend (part of the migration stream's RAM block
/// name, so it must never change).
pub(crate) const MEM_ID: &str = "mem";

/// Whether the line is for a fresh boot or an incoming migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// Boot the kernel.
    Boot,
    /// Wait for `migrate-incoming`.
    Incoming,
}

/// Descriptors the daemon opened for a confined QEMU, which cannot open
/// them itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Passed {
    /// The QMP socket, bound and listening (`-chardev socket,fd=N`).
    pub qmp: Option<RawFd>,
    /// The TAP (`-netdev tap,fd=N`).
    pub tap: Option<RawFd>,
}

/// QEMU's seccomp filter for confined VMMs: no obsolete system calls, no
/// set*id, no fork/exec, no scheduler or resource changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Escapes a value for QEMU's `key=value,…` option syntax (a comma is
/// written twice).
fn esc(v: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(v.len());
    for &b in v.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// `prefix` followed by the escaped path.
fn opt_path(prefix: &str, p: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(esc(p.as_os_str()));
    s
}

/// The kernel command line QEMU passes: the spec's, plus `tsc_early_khz=`
/// unless the spec already sets it.
pub fn kernel_cmdline(spec: &VmSpec, tsc_khz: Option<u64>) -> String {
    let mut line = spec.cmdline.trim().to_string();
    if let Some(khz) = tsc_khz {
        if !line
            .split_whitespace()
            .any(|w| w.starts_with("tsc_early_khz="))
        {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&format!("tsc_early_khz={khz}"));
        }
    }
    line
}

/// The argument vector (without the binary).
pub fn build(spec: &VmSpec, config: &QemuConfig, launch: Launch, passed: Passed) -> Vec<OsString> {
    let confined = config.confinement.is_some();
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&str]| a.extend(parts.iter().map(OsString::from));

    // amd64: microvm (no PCI, no firmware, PVH entry). arm64: virt, which
    // has virtio-mmio transports too (so the device lines are the same), a
    // PL011 UART for -serial, and the GIC version the accelerator can do.
    let mut machine = String::from(match config.arch {
        Arch::Amd64 => "microvm,acpi=on",
        Arch::Arm64 => "virt,gic-version=max",
    });
    if spec.memory.path().is_some() {
        machine.push_str(",memory-backend=");
        machine.push_str(MEM_ID);
    }
    push(&["-M", &machine]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    match config.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // virt's default CPU is a 32-bit cortex-a15; max is every feature
        // TCG emulates.
        Accel::Tcg if config.arch == Arch::Arm64 && confined => push(&[
            "-accel",
            &format!("tcg,tb-size={}", crate::confine::TCG_TB_MIB),
            "-cpu",
            "max",
        ]),
        Accel::Tcg if config.arch == Arch::Arm64 => push(&["-accel", "tcg", "-cpu", "max"]),
        // Confined: a bounded translation cache (QEMU's default is 1 GiB
        // of anonymous memory) that fits the cgroup's overhead.
        Accel::Tcg if confined => push(&[
            "-accel",
            &format!("tcg,tb-size={}", crate::confine::TCG_TB_MIB),
        ]),
        Accel::Tcg => push(&["-accel", "tcg"]),
    }
    push(&[
        "-smp",
        &spec.vcpus.to_string(),
        "-m",
        &format!("{}M", spec.memory_mib),
    ]);
    if let Some(path) = spec.memory.path() {
        // Shared: the file is guest RAM. Private: guest RAM starts as the
        // file's content and each page the guest writes becomes its own.
        let share = match spec.memory {
            MemoryBacking::Private { .. } => "off",
            _ => "on",
        };
        a.push("-object".into());
        let mut o = OsString::from(format!(
            "memory-backend-file,id={MEM_ID},size={}M,share={share},mem-path=",
            spec.memory_mib
        ));
        o.push(esc(path.as_os_str()));
        a.push(o);
    }
    // A guest reboot (panic=-1, `reboot`) ends the VMM: the daemon decides
    // what happens next.
    a.push("-no-reboot".into());

    a.push("-kernel".into());
    a.push(spec.kernel.clone().into_os_string());
    if let Some(initrd) = &spec.initrd {
        a.push("-initrd".into());
        a.push(initrd.clone().into_os_string());
    }
    a.push("-append".into());
    a.push(kernel_cmdline(spec, config.tsc_khz).into());

    // Serial console to stdout: a pipe the daemon copies into the capped
    // serial log (process::console).
    for w in [
        "-chardev",
        "stdio,id=serial0,signal=off",
        "-serial",
        "chardev:serial0",
    ] {
        a.push(w.into());
    }

    // QMP: a server socket that does not wait for us to connect (passed
    // already listening when confined).
    a.push("-chardev".into());
    match passed.qmp {
        Some(fd) => a.push(format!("socket,id=qmp,fd={fd},server=on,wait=off").into()),
        None => a.push(opt_path(
            "socket,id=qmp,server=on,wait=off,path=",
            &spec.work_dir.join(QMP_SOCKET),
        )),
    }
    a.push("-mon".into());
    a.push("chardev=qmp,mode=control".into());

    for d in &spec.drives {
        a.push("-drive".into());
        let mut o = OsString::from(format!(
            "id={},if=none,format=raw,readonly={},file=",
            d.id,
            if d.read_only { "on" } else { "off" }
        ));
        o.push(esc(d.path.as_os_str()));
        a.push(o);
        a.push("-device".into());
        // The id is also the disk's serial (`/sys/block/vd*/serial`): how
        // the guest tells volumes apart whatever their order.
        a.push(format!("virtio-blk-device,drive={0},serial={0}", d.id).into());
    }
    if let Some(net) = &spec.net {
        a.push("-netdev".into());
        match passed.tap {
            Some(fd) => a.push(format!("tap,id=net0,fd={fd}").into()),
            None => {
                a.push(format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap).into())
            }
        }
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net0,mac={}", net.mac).into());
    }
    if confined {
        a.push("-sandbox".into());
        a.push(SANDBOX.into());
    }
    if launch == Launch::Incoming {
        // Stopped after the load (no autostart): the restore spends its
        // snapshot before the guest runs (qemu/mod.rs).
        a.push("-S".into());
        a.push("-incoming".into());
        a.push("defer".into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DriveSpec, NetSpec};
    use std::path::PathBuf;

    fn config(accel: Accel) -> QemuConfig {
        QemuConfig {
            binary: "qemu-system-x86_64".into(),
            arch: Arch::Amd64,
            accel,
            tsc_khz: Some(2_596_092),
            confinement: None,
        }
    }

    fn text(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn full_command_line() {
        let mut spec = VmSpec::new("/k/vmlinux", "/run/vm1");
        spec.vcpus = 2;
        spec.memory_mib = 512;
        spec.cmdline = "console=ttyS0 quiet".into();
        spec.initrd = Some("/k/initrd".into());
        spec.memory = MemoryBacking::File {
            path: "/run/vm1/mem".into(),
        };
        spec.drives = vec![
            DriveSpec {
                id: "base".into(),
                path: "/img/base.ext4".into(),
                read_only: true,
            },
            DriveSpec {
                id: "rw".into(),
                path: "/run/vm1/a,b.img".into(),
                read_only: false,
            },
        ];
        spec.net = Some(NetSpec {
            tap: "tap7".into(),
            mac: "02:00:0a:00:00:07".parse().unwrap(),
        });
        let line = text(&build(
            &spec,
            &config(Accel::Kvm),
            Launch::Boot,
            Passed::default(),
        ));
        assert_eq!(
            line,
            "-M microvm,acpi=on,memory-backend=mem -nodefaults -no-user-config -display none \
             -accel kvm -cpu host -smp 2 -m 512M \
             -object memory-backend-file,id=mem,size=512M,share=on,mem-path=/run/vm1/mem -no-reboot \
             -kernel /k/vmlinux -initrd /k/initrd -append console=ttyS0 quiet tsc_early_khz=2596092 \
             -chardev stdio,id=serial0,signal=off -serial chardev:serial0 \
             -chardev socket,id=qmp,server=on,wait=off,path=/run/vm1/qmp.sock -mon chardev=qmp,mode=control \
             -drive id=base,if=none,format=raw,readonly=on,file=/img/base.ext4 -device virtio-blk-device,drive=base,serial=base \
             -drive id=rw,if=none,format=raw,readonly=off,file=/run/vm1/a,,b.img -device virtio-blk-device,drive=rw,serial=rw \
             -netdev tap,id=net0,ifname=tap7,script=no,downscript=no \
             -device virtio-net-device,netdev=net0,mac=02:00:0a:00:00:07"
        );
    }

    #[test]
    fn restore_line_is_the_boot_line_plus_incoming() {
        let spec = VmSpec::new("/k/vmlinux", "/run/vm1");
        let boot = build(&spec, &config(Accel::Tcg), Launch::Boot, Passed::default());
        let incoming = build(
            &spec,
            &config(Accel::Tcg),
            Launch::Incoming,
            Passed::default(),
        );
        assert_eq!(&incoming[..boot.len()], &boot[..]);
        assert_eq!(text(&incoming[boot.len()..]), "-S -incoming defer");
        let line = text(&boot);
        assert!(
            line.contains("-accel tcg -smp 1 -m 256M -no-reboot"),
            "{line}"
        );
        assert!(!line.contains("-cpu"), "{line}");
        assert!(!line.contains("memory-backend"), "{line}");
        assert!(!line.contains("-daemonize"));
    }

    #[test]
    fn passed_descriptors_replace_the_socket_path_and_the_tap_name() {
        let mut spec = VmSpec::new("/k/vmlinux", "/run/vm1");
        spec.net = Some(NetSpec {
            tap: "tap7".into(),
            mac: "02:00:0a:00:00:07".parse().unwrap(),
        });
        let passed = Passed {
            qmp: Some(5),
            tap: Some(6),
        };
        let line = text(&build(&spec, &config(Accel::Tcg), Launch::Boot, passed));
        assert!(
            line.contains("-chardev socket,id=qmp,fd=5,server=on,wait=off -mon"),
            "{line}"
        );
        assert!(line.contains("-netdev tap,id=net0,fd=6 -device"), "{line}");
        assert!(
            !line.contains("qmp.sock") && !line.contains("tap7"),
            "{line}"
        );
        // Unconfined: no seccomp flag, QEMU's own translation cache.
        assert!(
            !line.contains("-sandbox") && line.contains("-accel tcg -smp"),
            "{line}"
        );
    }

    #[test]
    fn a_confined_line_adds_seccomp_and_a_bounded_translation_cache_only() {
        let spec = VmSpec::new("/k/vmlinux", "/run/vm1");
        let mut confined = config(Accel::Tcg);
        confined.confinement = Some(std::sync::Arc::new(crate::confine::Confinement::for_tests()));
        let plain = text(&build(
            &spec,
            &config(Accel::Tcg),
            Launch::Boot,
            Passed::default(),
        ));
        let line = text(&build(&spec, &confined, Launch::Boot, Passed::default()));
        assert_eq!(
            line,
            format!(
                "{} -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
                plain.replace("-accel tcg ", "-accel tcg,tb-size=128 ")
            )
        );
        let incoming = text(&build(
            &spec,
            &confined,
            Launch::Incoming,
            Passed::default(),
        ));
        assert_eq!(incoming, format!("{line} -S -incoming defer"));
    }

    #[test]
    fn arm64_runs_virt_with_a_64_bit_cpu_and_the_same_devices() {
        let mut spec = VmSpec::new("/k/Image", "/run/vm1");
        spec.cmdline = "console=ttyAMA0".into();
        spec.memory = MemoryBacking::File {
            path: "/run/vm1/mem".into(),
        };
        spec.drives = vec![DriveSpec {
            id: "base".into(),
            path: "/img/base.ext4".into(),
            read_only: true,
        }];
        let amd = text(&build(
            &spec,
            &config(Accel::Tcg),
            Launch::Boot,
            Passed::default(),
        ));
        let arm_config =
            QemuConfig::for_arch("qemu-system-aarch64".into(), Accel::Tcg, Arch::Arm64);
        assert_eq!(arm_config.tsc_khz, None);
        let arm = text(&build(&spec, &arm_config, Launch::Boot, Passed::default()));
        assert!(
            arm.starts_with("-M virt,gic-version=max,memory-backend=mem "),
            "{arm}"
        );
        assert!(arm.contains(" -accel tcg -cpu max -smp 1 "), "{arm}");
        assert!(arm.contains("-append console=ttyAMA0 -chardev"), "{arm}");
        // Beyond the machine, the CPU and the TSC, the lines are the same.
        let strip = |l: &str| {
            l.replace("-M virt,gic-version=max", "-M microvm,acpi=on")
                .replace(" -cpu max", "")
                .replace(" tsc_early_khz=2596092", "")
        };
        assert_eq!(strip(&arm), strip(&amd));
    }

    #[test]
    fn tsc_is_appended_once() {
        let mut spec = VmSpec::new("/k", "/w");
        spec.cmdline = "console=ttyS0".into();
        assert_eq!(
            kernel_cmdline(&spec, Some(1000)),
            "console=ttyS0 tsc_early_khz=1000"
        );
        assert_eq!(kernel_cmdline(&spec, None), "console=ttyS0");
        spec.cmdline = "tsc_early_khz=5 console=ttyS0".into();
        assert_eq!(
            kernel_cmdline(&spec, Some(1000)),
            "tsc_early_khz=5 console=ttyS0"
        );
    }

    #[test]
    fn commas_are_escaped() {
        assert_eq!(esc(OsStr::new("/a,b,,c")), OsString::from("/a,,b,,,,c"));
        assert_eq!(
            opt_path("path=", &PathBuf::from("/x")),
            OsString::from("path=/x")
        );
    }
}
