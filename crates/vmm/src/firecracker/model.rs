//! Request and response bodies of the Firecracker API, field for field as
//! in its swagger (`src/firecracker/swagger/firecracker.yaml`). Only the
//! fields we use are modelled; optional ones are omitted when unset so that
//! older Firecracker versions, which reject unknown fields, accept them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel (an uncompressed ELF on x86_64).
    pub kernel_image_path: PathBuf,
    /// Kernel command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Host path of the initrd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// `PUT /drives/{drive_id}` (virtio-block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Must equal the `{drive_id}` in the path.
    pub drive_id: String,
    /// Host path of the image.
    pub path_on_host: PathBuf,
    /// Whether the kernel mounts this as `/dev/root` (we pass `root=` on the
    /// command line instead, so always false).
    pub is_root_device: bool,
    /// Read-only block device.
    pub is_read_only: bool,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Must equal the `{iface_id}` in the path.
    pub iface_id: String,
    /// Host TAP name.
    pub host_dev_name: String,
    /// Guest MAC (`aa:bb:cc:dd:ee:ff`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// 1–32.
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u32,
    /// Simultaneous multithreading (x86 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking, needed for diff snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// Actions of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Flush metrics.
    FlushMetrics,
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl-Alt-Del (x86: the guest reboots, which ends Firecracker).
    SendCtrlAltDel,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Desired state.
    pub state: VmRunState,
}

/// States of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmRunState {
    /// Stop the vCPUs.
    Paused,
    /// Run the vCPUs.
    Resumed,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full (default) or Diff.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
    /// File receiving the microVM (device) state.
    pub snapshot_path: PathBuf,
    /// File receiving guest memory.
    pub mem_file_path: PathBuf,
}

/// Snapshot types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of memory.
    Full,
    /// Memory dirtied since the last snapshot.
    Diff,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The microVM state file.
    pub snapshot_path: PathBuf,
    /// Where guest memory comes from.
    pub mem_backend: MemoryBackend,
    /// Track dirty pages after the load (diff snapshots). Deprecated in
    /// newer Firecracker in favour of `track_dirty_pages`, but accepted by
    /// every version, unlike its replacement.
    pub enable_diff_snapshots: bool,
    /// Resume the VM once loaded.
    pub resume_vm: bool,
    /// Point NICs at other TAPs than at snapshot time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
}

/// Guest memory source for a snapshot load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File (mapped lazily) or a UFFD handler.
    pub backend_type: MemoryBackendType,
    /// The memory file, or the UFFD handler's socket.
    pub backend_path: PathBuf,
}

/// Memory backend kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// `mmap` of a file.
    File,
    /// Page faults served by a userfaultfd handler process.
    Uffd,
}

/// One NIC's new TAP on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface as configured before the snapshot.
    pub iface_id: String,
    /// The new TAP.
    pub host_dev_name: String,
}

/// `GET /` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Application name.
    pub app_name: String,
    /// Instance id.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// Firecracker version.
    pub vmm_version: String,
}
