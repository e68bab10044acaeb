//! The bhatti API's bodies. Request bodies deny unknown fields, so a typo
//! is a 400 rather than a silently ignored setting. See `docs/api.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `{"error": "..."}`, the body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    pub status: String,
    pub version: String,
    /// `firecracker` or `qemu`.
    pub engine: String,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// Why this engine was chosen.
    pub engine_reason: String,
}

/// A file placed in a new sandbox at boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewFile {
    pub path: String,
    /// UTF-8 text; binary files go through `PUT /sandboxes/:id/files`.
    pub content: String,
    #[serde(default)]
    pub mode: Option<u32>,
}

/// `POST /sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Unique per user; generated when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Image name: a tier (`tiny`, `minimal`) or an OCI image pulled or
    /// imported on the server (docs/images.md); the configured default
    /// (`minimal`) when absent.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub cpus: Option<u32>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Its writable disk in MiB (the daemon's default, 2048 unless
    /// configured, when absent); charged to the user's disk quota.
    #[serde(default)]
    pub disk_size_mb: Option<u64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Names of the user's secrets to put in the sandbox's environment.
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub files: Vec<NewFile>,
    #[serde(default)]
    pub keep_hot: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where it may send (`public` when absent).
    #[serde(default)]
    pub egress: Option<Egress>,
    /// A command run by `/bin/sh -c` at every boot of the VM (not when it
    /// wakes from a snapshot: its processes carry on), as root, detached
    /// in a session of its own with the sandbox's env, in `/workspace`;
    /// its output goes to `/var/log/bhatti-init.log` in the guest. For
    /// daemons (`dockerd`). 1 to 8192 bytes, no NUL.
    #[serde(default)]
    pub init: Option<String>,
    /// The user's volumes to mount (at most 8); see `docs/state.md`.
    #[serde(default)]
    pub volumes: Vec<VolumeAttach>,
    /// Start from a checkpoint instead of booting (`{"checkpoint":
    /// "<name>"}`): its processes, memory and files, under a new identity.
    /// Image, shape, disk, env, files and init come from the checkpoint.
    #[serde(default)]
    pub from: Option<CreateFrom>,
    /// `"fresh"` boots even when a template of this image and shape
    /// exists; `"auto"` (the default) restores from the caller's template
    /// when there is one and the create carries nothing a boot must apply
    /// (env, secrets, files, init, volumes, a disk size other than the
    /// default).
    #[serde(default)]
    pub boot: Option<BootMode>,
}

/// Whether a create may restore from a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    /// From a template when one matches, else a boot.
    #[default]
    Auto,
    /// Always a boot.
    Fresh,
}

/// `POST /images/:name/templates`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WarmImage {
    /// The daemon's default when absent.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// The daemon's default when absent.
    #[serde(default)]
    pub memory_mb: Option<u64>,
}

/// A template: an image booted once, agent ready, captured; creates of
/// its image and shape restore from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Template {
    /// `<cpus>x<memory_mb>`: its name under its image.
    pub shape: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_size_mb: u64,
    /// What its files occupy on the host.
    pub bytes: u64,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

/// An image a caller can boot: a built tier, an OCI image of theirs or
/// one shared with everyone, or one the admin CLI put on the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageInfo {
    pub name: String,
    /// `tier` (built by `bhatti image build`), `oci` (an API image: pulled,
    /// imported or saved) or `server` (put there by the admin CLI; every
    /// user may boot it).
    pub kind: String,
    /// The owner's user name (API images only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Whether everyone may boot it (tiers and server images always).
    pub shared: bool,
    /// A registry reference, `import`, or `save:<sandbox>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Size of its root filesystem.
    pub size_bytes: u64,
    /// Milliseconds since the Unix epoch (0 when unknown).
    pub created_at: i64,
    /// The image config's run settings (`GET /images/:name` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ImageRunConfig>,
}

/// What an OCI image's config says about running it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageRunConfig {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
}

/// `POST /images/pull`.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    /// `[registry[:port]/]repository[:tag][@sha256:…]`.
    #[serde(rename = "ref")]
    pub reference: String,
    /// The image's name (default: the repository's last component).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Plain HTTP to this registry.
    #[serde(default)]
    pub insecure: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A bearer token (instead of a user and password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl std::fmt::Debug for PullImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullImage")
            .field("reference", &self.reference)
            .field("name", &self.name)
            .field("insecure", &self.insecure)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// `POST /sandboxes/:id/save`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SaveImage {
    /// The new image's name.
    pub name: String,
}

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Running,
    Succeeded,
    Failed,
}

/// How far a task has come.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskProgress {
    /// What it does now (`downloading`, `unpacking`, …).
    pub step: String,
    pub bytes_done: u64,
    /// 0 when not known yet.
    pub bytes_total: u64,
    /// Of `bytes_done`, what a pull found in the blob cache (not
    /// downloaded).
    #[serde(default)]
    pub bytes_cached: u64,
}

/// Why a task failed: the status its work would have answered, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskError {
    pub status: u16,
    pub error: String,
}

/// Long work (pull, import, save) running in the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Task {
    pub id: String,
    /// `pull`, `import` or `save`.
    pub kind: String,
    /// What it makes (an image's name).
    pub target: String,
    pub state: TaskState,
    pub progress: TaskProgress,
    /// The image made, once succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ImageInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<TaskError>,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
}

/// Where a new sandbox starts from, instead of a boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateFrom {
    /// One of the caller's checkpoints, by name or id.
    pub checkpoint: String,
}

/// `POST /sandboxes/:id/checkpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateCheckpoint {
    /// Unique among the caller's checkpoints (sandbox-name rules).
    pub name: String,
}

/// A checkpoint: a sandbox's memory and disk at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Checkpoint {
    pub id: String,
    pub name: String,
    /// The sandbox it was taken of (it may be gone since).
    pub sandbox: String,
    pub sandbox_id: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_size_mb: u64,
    /// What its files occupy on the host.
    pub bytes: u64,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

/// `POST /sandboxes/:id/restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RestoreSandbox {
    /// One of the caller's checkpoints (of a sandbox with the same image,
    /// CPUs, memory and disk size).
    pub checkpoint: String,
}

/// `POST /sandboxes/:id/fork`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ForkSandbox {
    /// The child's name; with `count` > 1, children are `<name>-1`, `<name>-2`, …
    /// (`<parent>-fork-1`, … when absent).
    #[serde(default)]
    pub name: Option<String>,
    /// How many children (1 to 16; 1 when absent).
    #[serde(default)]
    pub count: Option<u32>,
}

/// A volume to attach to a new sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeAttach {
    /// The volume's name.
    pub name: String,
    /// Absolute, normalised guest path, not `/` and not on, in or above a
    /// system path (`/bin /boot /dev /etc /lib* /proc /run /sbin /sys /usr
    /// /var/lib/bhatti /var/run`).
    pub mount: String,
    /// Mount read-only (a read-only attach may be shared; a read-write one
    /// is exclusive).
    #[serde(default)]
    pub read_only: bool,
}

/// `POST /volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// Unique per user: 1-63 of letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// Size in MiB (at least 64); charged to the user's disk quota.
    pub size_mb: u64,
}

/// `PATCH /volumes/:name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PatchVolume {
    /// A larger size in MiB (volumes only grow). Refused (409) while a
    /// sandbox using it runs hot or warm; cold ones give up their snapshot
    /// and boot from disk at their next command.
    pub size_mb: u64,
}

/// `POST /volumes/:name/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CloneVolume {
    /// The new volume's name (as for `POST /volumes`); it gets the
    /// source's size and content, charged to the disk quota.
    pub name: String,
}

/// A persistent volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Volume {
    pub name: String,
    pub size_mb: u64,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    pub updated_at: i64,
    /// The sandboxes it is attached to.
    pub attachments: Vec<VolumeUse>,
}

/// One sandbox's use of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VolumeUse {
    /// The sandbox's name.
    pub sandbox: String,
    pub mount: String,
    pub read_only: bool,
}

/// Where a sandbox may send, on top of the daemon's firewall: `"public"`
/// (the default: the internet, its siblings, its gateway's DNS), `"none"`
/// (only its gateway's DNS and ping) or `{"allow": [...]}` (its gateway
/// and the listed IPv4 prefixes, addresses, host names and `*.domain`
/// wildcards; at most 64 entries). See `docs/networking.md`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    #[default]
    Public,
    None,
    Allow(Vec<String>),
}

/// `PATCH /sandboxes/:id`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PatchSandbox {
    #[serde(default)]
    pub keep_hot: Option<bool>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// A new egress policy, in force at once.
    #[serde(default)]
    pub egress: Option<Egress>,
    /// A larger disk, in MiB (disks only grow). Only while the sandbox's
    /// VM does not run: a hot or warm sandbox is a 409; a cold one drops
    /// its snapshot (its processes end, its files stay) and boots from
    /// its disk at the next command, the file system grown to fill it.
    #[serde(default)]
    pub disk_size_mb: Option<u64>,
}

/// Where a sandbox is in its life, as the API shows it (and the store
/// keeps it). Serialised lowercase: `creating`, `running`, `stopped`,
/// `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SandboxStatus {
    /// Its VM is being set up.
    Creating,
    /// Its VM runs (hot, warm) or is snapshotted (cold).
    Running,
    /// Its VM is not running and no snapshot is kept; its disk is, and the
    /// next operation that needs the guest boots it again.
    Stopped,
    /// It cannot run; `status_reason` says why. Only destroy helps.
    Failed,
}

/// How warm a running sandbox is: `hot` (vCPUs run), `warm` (paused),
/// `cold` (snapshotted, no VMM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Thermal {
    Hot,
    Warm,
    Cold,
}

/// A string that names no value of a status enum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownState(pub String);

impl std::fmt::Display for UnknownState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown state '{}'", self.0)
    }
}

impl std::error::Error for UnknownState {}

/// `as_str`, `Display`, `FromStr` and comparison with text for a
/// lowercase-serialised enum.
macro_rules! text_enum {
    ($t:ty { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $t {
            /// The wire form.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $(<$t>::$v => $s,)+
                }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::str::FromStr for $t {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($s => Ok(<$t>::$v),)+
                    other => Err(UnknownState(other.to_string())),
                }
            }
        }
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

text_enum!(SandboxStatus {
    Creating => "creating",
    Running => "running",
    Stopped => "stopped",
    Failed => "failed",
});

text_enum!(Thermal {
    Hot => "hot",
    Warm => "warm",
    Cold => "cold",
});

/// A sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mb: u64,
    /// Its writable disk, in MiB.
    #[serde(default)]
    pub disk_size_mb: u64,
    pub status: SandboxStatus,
    #[serde(default)]
    pub status_reason: Option<String>,
    pub thermal: Thermal,
    /// When the thermal state last changed (Unix ms).
    pub thermal_since: i64,
    pub ip: Option<String>,
    pub keep_hot: bool,
    pub labels: BTreeMap<String, String>,
    /// Unix ms.
    pub created_at: i64,
    /// Its ports reachable through the public proxy.
    #[serde(default)]
    pub published: Vec<Published>,
    /// Where it may send.
    #[serde(default)]
    pub egress: Egress,
    /// The command it runs at boot (`init` on create), if any.
    #[serde(default)]
    pub init: Option<String>,
}

/// `POST /sandboxes/:id/publish`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PublishPort {
    /// 1-65535.
    pub port: u16,
    /// 3-63 of a-z, 0-9 and inner '-' (any case; stored lowercase);
    /// `<sandbox-name>-<port>` (with a random suffix if taken) when absent.
    #[serde(default)]
    pub alias: Option<String>,
}

/// A port published through the public proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Published {
    pub port: u16,
    pub alias: String,
    /// Where the public reaches it.
    pub url: String,
    /// Only in the answer to a publish: whether something listened on the
    /// port then (absent when the sandbox was not hot: publishing never
    /// wakes it to look).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listening: Option<bool>,
}

/// `POST /sandboxes/:id/share`: a link to the sandbox's browser terminal.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateShare {
    /// Seconds the link lives: 1 to the daemon's `share.max_ttl_secs`;
    /// `share.default_ttl_secs` when absent.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// The link shows the terminal but cannot type in it (nor resize it).
    #[serde(default)]
    pub read_only: bool,
    /// Give the URL on the public proxy (`bhatti publish --shell`), which
    /// serves the terminal too, rather than on the API listener. 403 when
    /// publishing is off.
    #[serde(default)]
    pub public: bool,
}

/// A share link as listed (its token is shown only when it is made).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Share {
    /// `shr-…`: names the link for `DELETE /sandboxes/:id/shares/:share_id`.
    pub id: String,
    /// The sandbox's name.
    pub sandbox: String,
    pub read_only: bool,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms; refused from then on.
    pub expires_at: i64,
}

/// The answer to `POST /sandboxes/:id/share`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ShareCreated {
    #[serde(flatten)]
    pub share: Share,
    /// `bhs_…`: the secret. Shown once; the daemon keeps only its hash.
    pub token: String,
    /// The terminal page with the token in the URL fragment (never sent
    /// to a server): `<base>/share/#t=<token>`. `<base>` is the public
    /// proxy's (`public`), else `share.base_url`, else `http://` and the
    /// request's `Host`.
    pub url: String,
    /// The page's path with the token, to put after another base URL.
    pub path: String,
}

/// `GET /share/info` (with `Authorization: Bearer bhs_…`): what a share
/// token opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ShareSession {
    /// The sandbox's name.
    pub sandbox: String,
    pub read_only: bool,
    /// Unix ms.
    pub expires_at: i64,
}

/// The first text frame on `GET /share/ws`: the token (a browser cannot
/// set headers on a WebSocket) and what to attach to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ShareOpen {
    /// `bhs_…`.
    pub token: String,
    /// The session to attach to (created when absent); default `web`.
    #[serde(default)]
    pub session: Option<String>,
    /// Take the session over from another attached client.
    #[serde(default)]
    pub steal: bool,
    #[serde(default)]
    pub rows: Option<u16>,
    #[serde(default)]
    pub cols: Option<u16>,
}

/// `POST /sandboxes/:id/exec`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Default 300, at most 86400.
    #[serde(default)]
    pub timeout_sec: Option<u64>,
    #[serde(default)]
    pub detach: bool,
}

/// The answer to a collected exec. Output that is not UTF-8 is converted
/// lossily; use NDJSON streaming or files for binary output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    #[serde(default)]
    pub timed_out: bool,
    /// Stdout went past the daemon's `limits.max_exec_output` and the rest
    /// was left out (the command still ran to its end).
    #[serde(default)]
    pub stdout_truncated: bool,
    /// As `stdout_truncated`, for stderr.
    #[serde(default)]
    pub stderr_truncated: bool,
}

/// The answer to a detached exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Detached {
    pub pid: u32,
    pub log_path: String,
}

/// One line of an NDJSON exec stream (`Accept: application/x-ndjson`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecLine {
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    Exit {
        exit_code: i32,
        #[serde(default)]
        timed_out: bool,
    },
    Error {
        error: String,
    },
}

/// First text message on `WS /sandboxes/:id/ws`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ShellOpen {
    /// Attach to this session (created when absent and `new` or not found).
    #[serde(default)]
    pub session: Option<String>,
    /// Always start a new session.
    #[serde(default)]
    pub new: bool,
    /// Take the session over from another attached client.
    #[serde(default)]
    pub steal: bool,
    /// Command of a new session (the user's shell when absent).
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub rows: Option<u16>,
    #[serde(default)]
    pub cols: Option<u16>,
}

/// Control messages over the shell WebSocket (text frames; terminal bytes
/// travel as binary frames).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ShellControl {
    /// Server → client: attached to this session.
    Attached {
        session: String,
        pid: u32,
    },
    /// Client → server.
    Resize {
        rows: u16,
        cols: u16,
    },
    /// Client → server: leave the session running.
    Detach,
    /// Server → client: the session's command ended.
    Exit {
        exit_code: i32,
    },
    /// Server → client: the attachment ended (detached, taken over).
    Detached {
        reason: String,
    },
    Error {
        error: String,
    },
}

/// One entry of `GET /sandboxes/:id/files?ls=true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileEntry {
    pub name: String,
    /// `file`, `dir`, `symlink`, `other`.
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub mtime_ms: i64,
    #[serde(default)]
    pub symlink_target: Option<String>,
}

/// `GET /sandboxes/:id/files?ls=true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Listing {
    pub path: String,
    pub entries: Vec<FileEntry>,
    pub total: u64,
    pub truncated: bool,
}

/// `PUT /sandboxes/:id/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Written {
    pub path: String,
    pub bytes: u64,
}

/// One PTY session of `GET /sandboxes/:id/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionSummary {
    pub session: String,
    pub pid: u32,
    pub cmd: Vec<String>,
    pub attached: bool,
    pub created_at: i64,
    pub last_activity_at: i64,
}

/// `POST /secrets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewSecret {
    pub name: String,
    pub value: String,
}

/// A secret as listed: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecretSummary {
    pub name: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A TCP port listening in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Port {
    pub port: u16,
    /// The address it is bound to: `0.0.0.0`, `127.0.0.1`, `::`, …
    pub address: String,
    /// `tcp`.
    pub protocol: String,
}

/// `GET /sandboxes/:id/ports`: sorted by port, the agent's own left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PortList {
    pub ports: Vec<Port>,
}

/// A recorded event (`GET /events`; one per line with `follow=true`):
/// a sandbox's status change (`running`, `stopped`, `failed`, …), thermal
/// transition (`warm`, `hot`, `cold`, `restore_failed`, …) or the like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// Increases with every event recorded: a cursor.
    pub id: i64,
    /// The user whose sandbox it is about.
    pub user_id: String,
    pub sandbox_id: Option<String>,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: String,
    /// Details by type (a reason, `took_ms`, …).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub detail: serde_json::Value,
    /// When, in Unix milliseconds.
    pub at: i64,
}

/// `GET /admin/status`: the daemon at a glance (admin keys only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminStatus {
    /// Version and VM engine, as `GET /health` says them.
    pub health: Health,
    pub users: u64,
    /// Every sandbox by status (`creating`, `running`, `stopped`, `failed`).
    pub sandboxes: std::collections::BTreeMap<String, u64>,
    /// Running sandboxes by thermal tier (`hot`, `warm`, `cold`).
    pub running_by_tier: std::collections::BTreeMap<String, u64>,
    pub capacity: Capacity,
}

/// The host's CPUs and memory, and what the sandboxes holding a VM
/// (`running`, hot or warm) were given of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capacity {
    pub host_cpus: u64,
    pub host_memory_mb: u64,
    /// The host's available memory now (`MemAvailable`).
    pub host_memory_available_mb: u64,
    /// vCPUs of hot and warm sandboxes.
    pub cpus_allocated: u64,
    /// Guest memory of hot and warm sandboxes.
    pub memory_mb_allocated: u64,
    /// Resident memory of this daemon's VMM processes together.
    pub vmm_resident_mb: u64,
}

/// Response headers of every API answer.
pub mod response_headers {
    /// The request's id: the client's `X-Request-Id` when sane (1–128
    /// visible ASCII characters), else a new one. Daemon log lines of the
    /// request name it.
    pub const REQUEST_ID: &str = "x-request-id";
    /// The daemon's version.
    pub const VERSION: &str = "x-bhatti-version";
    /// The oldest CLI version that speaks this daemon's API
    /// ([`super::MIN_CLIENT_VERSION`]); an older CLI warns.
    pub const MIN_CLIENT: &str = "x-bhatti-min-client";
}

/// The oldest CLI that speaks this API: raise it with a change an older
/// CLI would misread (a renamed field, a changed route).
pub const MIN_CLIENT_VERSION: &str = "0.1.0";

/// Response headers of file reads.
pub mod headers {
    /// Size of the whole file, whatever part the body holds.
    pub const FILE_SIZE: &str = "x-file-size";
    /// `true` when limits left part of the file out.
    pub const TRUNCATED: &str = "x-truncated";
    pub const FILE_MODE: &str = "x-file-mode";
    pub const FILE_KIND: &str = "x-file-kind";
}

/// Limits the API enforces at the edge.
pub mod limits {
    pub const DEFAULT_EXEC_TIMEOUT_SEC: u64 = 300;
    pub const MAX_EXEC_TIMEOUT_SEC: u64 = 86_400;
    /// JSON bodies.
    pub const MAX_JSON_BODY: usize = 1024 * 1024;
    /// Events one `GET /events` returns by default, and at most.
    pub const DEFAULT_EVENTS: u32 = 100;
    pub const MAX_EVENTS: u32 = 1000;
    /// File uploads (the agent's write limit).
    pub const MAX_FILE_BODY: u64 = 100 * 1000 * 1000;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_reject_unknown_fields() {
        assert!(serde_json::from_str::<CreateSandbox>(r#"{"name":"a","cpu":2}"#).is_err());
        assert!(serde_json::from_str::<ExecBody>(r#"{"cmd":["x"],"timeout":1}"#).is_err());
        let c: CreateSandbox = serde_json::from_str(r#"{"name":"a","cpus":2}"#).unwrap();
        assert_eq!((c.name.as_deref(), c.cpus), (Some("a"), Some(2)));
    }

    #[test]
    fn stream_lines_are_tagged() {
        let l = ExecLine::Exit {
            exit_code: 3,
            timed_out: false,
        };
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"{"type":"exit","exit_code":3,"timed_out":false}"#
        );
        let l: ExecLine = serde_json::from_str(r#"{"type":"stdout","data":"hi"}"#).unwrap();
        assert_eq!(l, ExecLine::Stdout { data: "hi".into() });
        let c: ShellControl =
            serde_json::from_str(r#"{"type":"resize","rows":10,"cols":20}"#).unwrap();
        assert_eq!(c, ShellControl::Resize { rows: 10, cols: 20 });
    }

    #[test]
    fn states_keep_their_lowercase_wire_form() {
        for (st, text) in [
            (SandboxStatus::Creating, "creating"),
            (SandboxStatus::Running, "running"),
            (SandboxStatus::Stopped, "stopped"),
            (SandboxStatus::Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_string(&st).unwrap(), format!("\"{text}\""));
            assert_eq!(text.parse::<SandboxStatus>().unwrap(), st);
            assert_eq!(st, text);
        }
        for (t, text) in [
            (Thermal::Hot, "hot"),
            (Thermal::Warm, "warm"),
            (Thermal::Cold, "cold"),
        ] {
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{text}\""));
            assert_eq!(text.parse::<Thermal>().unwrap(), t);
        }
        assert!("Running".parse::<SandboxStatus>().is_err());
        assert!(serde_json::from_str::<Thermal>("\"tepid\"").is_err());
    }
}
