//! The VM of a sandbox: the files it lives in, the [`VmSpec`] a sandbox
//! boots (or is restored) with, and the handle core keeps while a VMM runs.

use std::path::Path;
use std::sync::Arc;

use agent_client::AgentClient;
use image::disk::{CONFIG_DRIVE, SANDBOX_DISK};
use image::ResolvedImage;
use net::Attachment;
use vmm::{DriveSpec, MacAddr, MemoryBacking, NetSpec, VmSpec, Vmm};

use crate::spec::{SandboxSpec, VolumeSpec};

/// The TCP port lohar listens on in the guest (defined by the protocol).
pub use proto::AGENT_PORT;
/// File name of the guest console log in a sandbox directory.
pub const SERIAL_LOG: &str = "serial.log";
/// The kernel command line before the network arguments: serial console,
/// no crypto self-tests (~0.4 s under TCG), quiet, and a panic ends QEMU.
/// The QEMU backend appends `tsc_early_khz=` itself.
pub const BASE_CMDLINE: &str = "console=ttyS0 cryptomgr.notests quiet panic=-1";
/// The same for arm64 guests, whose serial console is the PL011 `ttyAMA0`.
pub const BASE_CMDLINE_ARM64: &str = "console=ttyAMA0 cryptomgr.notests quiet panic=-1";

/// The base command line for `arch` guests.
pub fn base_cmdline(arch: vmm::Arch) -> &'static str {
    match arch {
        vmm::Arch::Amd64 => BASE_CMDLINE,
        vmm::Arch::Arm64 => BASE_CMDLINE_ARM64,
    }
}

/// File name of guest RAM in a sandbox directory (QEMU
/// `memory-backend-file,share=on`): a snapshot leaves it in place.
pub const MEMORY_FILE: &str = "memory.ram";
/// Directory of a sandbox's snapshot (device state and manifest).
pub const SNAPSHOT_DIR: &str = "snapshot";

/// A running VM and the client of its agent.
#[derive(Debug, Clone)]
pub(crate) struct Vm {
    pub(crate) vmm: Arc<dyn Vmm>,
    pub(crate) client: AgentClient,
}

/// The VM for a sandbox: vda = the image's rootfs (read-only, shared),
/// vdb = the sandbox disk, vdc = the config drive, then one drive per
/// volume (`bhv-<n>`); kernel arguments carry the static address.
pub(crate) fn vm_spec(
    spec: &SandboxSpec,
    image: &ResolvedImage,
    dir: &Path,
    att: &Attachment,
) -> VmSpec {
    VmSpec {
        vcpus: spec.cpus,
        memory_mib: spec.memory_mb,
        kernel: image.vmlinux.clone(),
        initrd: Some(image.initramfs.clone()),
        cmdline: format!("{} {}", base_cmdline(image.arch), att.kernel_args()),
        drives: [
            DriveSpec {
                id: "rootfs".into(),
                path: image.rootfs.clone(),
                read_only: true,
            },
            DriveSpec {
                id: "disk".into(),
                path: dir.join(SANDBOX_DISK),
                read_only: false,
            },
            DriveSpec {
                id: "config".into(),
                path: dir.join(CONFIG_DRIVE),
                read_only: true,
            },
        ]
        .into_iter()
        .chain(spec.volumes.iter().enumerate().map(|(i, v)| DriveSpec {
            id: VolumeSpec::drive_id(i),
            path: v.path.clone(),
            read_only: v.read_only,
        }))
        .collect(),
        net: Some(NetSpec {
            tap: att.tap.clone(),
            mac: MacAddr(att.mac.0),
        }),
        serial_log: dir.join(SERIAL_LOG),
        work_dir: dir.to_path_buf(),
        // Guest RAM in a file of the sandbox: going cold writes only device
        // state, and a restore maps this file lazily.
        memory: MemoryBacking::File {
            path: dir.join(MEMORY_FILE),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_spec_follows_the_guest_contract() {
        let mut image = ResolvedImage {
            name: "tiny".into(),
            tier: Some(image::Tier::Tiny),
            run_config: None,
            arch: vmm::Arch::Amd64,
            vmlinux: "/d/images/kernel/vmlinux".into(),
            vmlinuz: "/d/images/kernel/vmlinuz".into(),
            kernel_release: "6.1".into(),
            initramfs: "/d/images/initramfs/initramfs.cpio".into(),
            rootfs: "/d/images/tiny/rootfs.ext4".into(),
        };
        let att = Attachment {
            bridge: "bhatti0".into(),
            tap: "bt0ac80002".into(),
            ip: "10.200.0.2".parse().unwrap(),
            prefix: 24,
            mac: net::Mac::for_ip("10.200.0.2".parse().unwrap()),
            gateway: "10.200.0.1".parse().unwrap(),
            dns: None,
        };
        let mut spec = SandboxSpec::new("a", "tiny");
        spec.cpus = 2;
        spec.memory_mb = 300;
        let dir = Path::new("/d/sandboxes/sb-000000000001");
        let v = vm_spec(&spec, &image, dir, &att);
        assert_eq!(
            v.cmdline,
            "console=ttyS0 cryptomgr.notests quiet panic=-1 bhatti.ip=10.200.0.2/24 bhatti.gw=10.200.0.1"
        );
        let drives: Vec<_> = v
            .drives
            .iter()
            .map(|d| (d.path.to_str().unwrap(), d.read_only))
            .collect();
        assert_eq!(
            drives,
            vec![
                ("/d/images/tiny/rootfs.ext4", true),
                ("/d/sandboxes/sb-000000000001/disk.ext4", false),
                ("/d/sandboxes/sb-000000000001/config.img", true),
            ]
        );
        assert_eq!((v.vcpus, v.memory_mib), (2, 300));
        let mut with = spec.clone();
        with.volumes = vec![VolumeSpec {
            path: "/d/volumes/u/vol-1.ext4".into(),
            uuid: "2b5e3f0e-9a1c-4d2b-8e7f-0123456789ab".into(),
            mount: "/data".into(),
            read_only: true,
        }];
        let vd = vm_spec(&with, &image, dir, &att).drives;
        assert_eq!(vd.len(), 4);
        assert_eq!(
            (
                vd[3].id.as_str(),
                vd[3].path.to_str().unwrap(),
                vd[3].read_only
            ),
            ("bhv-0", "/d/volumes/u/vol-1.ext4", true)
        );
        let cfg = with.config_drive("t".repeat(32));
        assert_eq!(cfg.volumes[0].serial, "bhv-0");
        assert!(cfg.volumes[0].read_only);
        assert_eq!(v.net.as_ref().unwrap().mac.to_string(), "02:b4:0a:c8:00:02");
        assert_eq!(v.work_dir, dir);
        assert_eq!(
            v.initrd.as_deref(),
            Some(Path::new("/d/images/initramfs/initramfs.cpio"))
        );
        image.arch = vmm::Arch::Arm64;
        let v = vm_spec(&spec, &image, dir, &att);
        assert!(
            v.cmdline.starts_with("console=ttyAMA0 cryptomgr.notests"),
            "{}",
            v.cmdline
        );
    }
}
