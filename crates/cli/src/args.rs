//! The client commands as clap types, and the pure parsers of their values
//! (`K=V`, `local:guest`, memory sizes, file modes).

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// Options every client command accepts, anywhere on the command line.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Server URL [env: BHATTI_URL; default: the config file, then http://127.0.0.1:8700]
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// API token (bht_…) [env: BHATTI_TOKEN; default: the config file]
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// PEM file of CA certificates to trust for an https:// server, on top
    /// of the system's [env: BHATTI_CA_FILE; default: ca_file in the config file]
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<String>,
    /// Print the API's JSON instead of tables (read commands)
    #[arg(long, global = true)]
    pub json: bool,
}

/// `bhatti admin …`.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum AdminCommand {
    /// The daemon at a glance: engine, users, sandboxes by status and
    /// tier, capacity used and free.
    Status,
}

/// `bhatti events`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct EventsArgs {
    /// Keep going: print new events as they are recorded, until Ctrl+C.
    #[arg(short, long)]
    pub follow: bool,
    /// Only this sandbox's events (name or id).
    #[arg(long, value_name = "NAME")]
    pub sandbox: Option<String>,
    /// Only events of this type (running, stopped, warm, hot, cold, …).
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// How many of the newest to show first (1–1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

/// The client commands of the `bhatti` binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a server URL and token (--url, --token) and save them to the config file.
    Setup,
    /// Create a sandbox (answers the existing one when the name is taken).
    Create(CreateArgs),
    /// List your sandboxes.
    List,
    /// Show one sandbox (never wakes it).
    Inspect {
        /// Sandbox name or id.
        name: String,
    },
    /// Run a command in a sandbox, streaming its output; exits with its exit code.
    Exec(ExecArgs),
    /// Open an interactive shell in a sandbox (Ctrl+\ detaches).
    Shell(ShellArgs),
    /// List a sandbox's shell sessions.
    Ps {
        /// Sandbox name or id.
        name: String,
    },
    /// Read, write and list files in a sandbox.
    #[command(subcommand)]
    File(FileCommand),
    /// Manage your secrets (values are never shown).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Manage your persistent volumes (attach with `create --volume`).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Checkpoints: a sandbox's memory and disk at one instant, to roll
    /// back to or start new sandboxes from (`create --from-checkpoint`).
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Make your template of an image (`bhatti image warm`): creates of
    /// that image and shape then restore instead of booting.
    #[command(hide = true)]
    ImageWarm(WarmArgs),
    /// `bhatti image list|inspect|pull|import|save|delete|share|unshare`
    /// (the `bhatti` binary's `image` command hands these over).
    #[command(name = "image-api", hide = true, subcommand)]
    Image(ImageClientCommand),
    /// Fork a running sandbox: new sandboxes with its processes, memory
    /// (copy-on-write) and files, each with its own name and address.
    Fork {
        /// Sandbox name or id.
        name: String,
        /// How many children (1 to 16).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The child's name (with --count N: NAME-1 … NAME-N) [default: <sandbox>-fork-K].
        #[arg(long = "as", value_name = "NAME")]
        child: Option<String>,
    },
    /// Show your sandboxes' recorded events (status changes, thermal
    /// transitions, …), oldest first; an admin key sees everyone's.
    Events(EventsArgs),
    /// Daemon-wide views (admin keys only).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Put a sandbox to sleep now: snapshot to disk, VM exits (cold).
    Stop {
        /// Sandbox name or id.
        name: String,
    },
    /// Wake a warm or cold sandbox now (it also wakes by itself when used).
    Start {
        /// Sandbox name or id.
        name: String,
        /// Try again after a failed restore (closes the circuit breaker).
        #[arg(long)]
        force: bool,
    },
    /// Change a sandbox's settings (an egress change is in force at once).
    Edit {
        /// Sandbox name or id.
        name: String,
        /// Never pause or snapshot it when idle.
        #[arg(long, value_name = "true|false")]
        keep_hot: Option<bool>,
        /// Grow its disk: MiB, or with a unit (20G). Only while it is cold
        /// (`bhatti stop`): its processes end, its files stay, and it boots
        /// from the larger disk at the next command.
        #[arg(long, value_name = "SIZE", value_parser = parse_disk_mb)]
        disk: Option<u64>,
        #[command(flatten)]
        egress: EgressArgs,
    },
    /// List the TCP ports listening in a sandbox (wakes it).
    Ports {
        /// Sandbox name or id.
        name: String,
    },
    /// Forward a local TCP port to a port in a sandbox (any TCP protocol),
    /// through the daemon, until Ctrl+C.
    Forward(ForwardArgs),
    /// Publish a sandbox port at a public URL (no token needed to reach it;
    /// a sleeping sandbox wakes on the first request). Prints the URL.
    Publish(PublishArgs),
    /// Share a sandbox's terminal: print a link that opens it in a browser
    /// (no API key needed), list the live links, or revoke them.
    Share(ShareArgs),
    /// Stop publishing a sandbox port.
    Unpublish {
        /// Sandbox name or id.
        name: String,
        /// The published port.
        #[arg(short, long, value_parser = clap::value_parser!(u16).range(1..))]
        port: u16,
    },
    /// Destroy a sandbox and its disk.
    Destroy {
        /// Sandbox name or id.
        name: String,
    },
    /// Print the client's version and, when reachable, the server's.
    Version,
    /// Serve MCP (Model Context Protocol) on stdin/stdout: the sandbox tools for MCP clients, calling this server with this key.
    Mcp,
    /// Print a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Unique among your sandboxes; generated when absent.
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory: MiB, or with a unit (512M, 2G).
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_mb)]
    pub memory: Option<u64>,
    /// Writable disk: MiB, or with a unit (10G) [default on the server: 2G].
    #[arg(long, value_name = "SIZE", value_parser = parse_disk_mb)]
    pub disk: Option<u64>,
    /// Image name [default on the server: minimal].
    #[arg(long)]
    pub image: Option<String>,
    /// Environment variable for every command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Put one of your secrets into the environment (repeatable).
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
    /// Copy a local text file into the sandbox at boot (repeatable).
    #[arg(long = "file", value_name = "LOCAL:GUEST", value_parser = parse_file_spec)]
    pub files: Vec<FileSpec>,
    /// Mount one of your volumes: NAME:/path, or NAME:/path:ro for a
    /// read-only mount (repeatable, at most 8).
    #[arg(long = "volume", value_name = "NAME:PATH[:ro]", value_parser = parse_volume)]
    pub volumes: Vec<api_types::VolumeAttach>,
    /// Never pause or snapshot this sandbox when idle.
    #[arg(long)]
    pub keep_hot: bool,
    /// A label (repeatable).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    #[command(flatten)]
    pub egress: EgressArgs,
    /// A command run by `/bin/sh -c` at every boot, as root, detached (for
    /// daemons); its output goes to /var/log/bhatti-init.log in the sandbox.
    #[arg(long, value_name = "CMD")]
    pub init: Option<String>,
    /// Start from one of your checkpoints instead of booting (its image,
    /// size, env and files come with it).
    #[arg(long, value_name = "CHECKPOINT", conflicts_with_all = ["cpus", "memory", "disk", "image", "env", "secrets", "files", "volumes", "init"])]
    pub from_checkpoint: Option<String>,
    /// Boot even when your template of this image and shape could be
    /// restored instead.
    #[arg(long)]
    pub fresh: bool,
}

/// Where a sandbox may send: `--egress public|none`, or an allow-list
/// with `--allow` (repeatable).
#[derive(Debug, Clone, Default, Args)]
pub struct EgressArgs {
    /// Where it may send: public (the internet; the default) or none (only
    /// its gateway's DNS).
    #[arg(long, value_enum, value_name = "public|none")]
    pub egress: Option<EgressKind>,
    /// Allow only its gateway and this IPv4 prefix, address or host name
    /// (`*.example.org` for every name under a domain); repeatable, at most
    /// 64.
    #[arg(long = "allow", value_name = "CIDR|IP|NAME", conflicts_with = "egress")]
    pub allow: Vec<String>,
}

/// `--egress` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EgressKind {
    Public,
    None,
}

impl EgressArgs {
    /// The policy these flags ask for; `None` when they ask for nothing.
    pub fn policy(&self) -> Option<api_types::Egress> {
        match (self.egress, self.allow.is_empty()) {
            (_, false) => Some(api_types::Egress::Allow(self.allow.clone())),
            (Some(EgressKind::Public), true) => Some(api_types::Egress::Public),
            (Some(EgressKind::None), true) => Some(api_types::Egress::None),
            (None, true) => None,
        }
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Sandbox name or id.
    pub name: String,
    /// Kill the command after this many seconds (server default 300).
    #[arg(long, value_name = "SEC", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: Option<u64>,
    /// Working directory in the sandbox.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Sandbox name or id.
    pub name: String,
    /// The port in the sandbox (something may start listening later).
    #[arg(short, long, value_parser = clap::value_parser!(u16).range(1..),
          required_unless_present = "shell")]
    pub port: Option<u16>,
    /// The public name: 3-63 of a-z, 0-9, '-' [default: <sandbox>-<port>].
    #[arg(long, conflicts_with = "shell")]
    pub alias: Option<String>,
    /// Publish the sandbox's browser terminal instead of a port: a share
    /// link on the public proxy (see `bhatti share`).
    #[arg(long, conflicts_with = "port")]
    pub shell: bool,
    /// With --shell: how long the link lives (as `bhatti share --ttl`).
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl, conflicts_with = "port")]
    pub ttl: Option<u64>,
    /// With --shell: the link cannot type.
    #[arg(long, conflicts_with = "port")]
    pub read_only: bool,
}

#[derive(Debug, Args)]
pub struct ShareArgs {
    /// Sandbox name or id.
    pub name: String,
    /// How long the link lives: seconds, or a number with s, m, h or d
    /// (`90s`, `30m`, `1h`, `7d`) [default: the daemon's, 1h].
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: Option<u64>,
    /// The link shows the terminal but cannot type in it.
    #[arg(long)]
    pub read_only: bool,
    /// List the sandbox's live links.
    #[arg(long, conflicts_with_all = ["ttl", "read_only", "revoke"])]
    pub list: bool,
    /// Revoke the link with this id (`shr-…`), or with --all every link.
    #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = "",
          conflicts_with_all = ["ttl", "read_only"])]
    pub revoke: Option<String>,
    /// With --revoke: every link of the sandbox.
    #[arg(long, requires = "revoke")]
    pub all: bool,
}

/// A link lifetime: `N`, `Ns`, `Nm`, `Nh` or `Nd`, at least a second.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 30m, 1h, 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: the unit is one of s, m, h, d"
            ))
        }
    };
    match n.checked_mul(mult) {
        Some(0) => Err("the duration must be at least 1s".into()),
        Some(v) => Ok(v),
        None => Err(format!("duration {s:?} is too long")),
    }
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// Sandbox name or id.
    pub name: String,
    /// The port in the sandbox.
    #[arg(value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// The local port [default: the same number]; 0 picks a free one.
    #[arg(long, value_name = "N")]
    pub local_port: Option<u16>,
    /// The local address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Sandbox name or id.
    pub name: String,
    /// Start a new session even if one exists.
    #[arg(long, conflicts_with = "session")]
    pub new: bool,
    /// Attach to this session (its recent output is replayed).
    #[arg(long, value_name = "S")]
    pub session: Option<String>,
    /// Take the session over from another attached client.
    #[arg(long, requires = "session")]
    pub steal: bool,
}

#[derive(Debug, Subcommand)]
pub enum FileCommand {
    /// Write a file (or some of its lines) to standard output, byte for byte.
    Read {
        name: String,
        path: String,
        /// Skip this many lines.
        #[arg(long, value_name = "LINES")]
        offset: Option<u64>,
        /// Print at most this many lines (after the offset).
        #[arg(long, value_name = "LINES")]
        limit: Option<u64>,
        /// Print at most this many bytes (whichever limit ends first).
        #[arg(long, value_name = "BYTES")]
        max_bytes: Option<u64>,
    },
    /// Write a local file (or standard input: `-` or nothing) to PATH, atomically.
    Write {
        name: String,
        path: String,
        /// Local file, or `-` for standard input.
        #[arg(default_value = "-")]
        local: String,
        /// File mode in octal (e.g. 0755).
        #[arg(long, value_parser = parse_mode)]
        mode: Option<u32>,
    },
    /// List a directory.
    Ls { name: String, path: String },
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret; the value is read from standard input when VALUE is `-`
    /// or absent (a VALUE argument lands in your shell history).
    Set {
        name: String,
        #[arg(default_value = "-")]
        value: String,
    },
    /// List your secrets' names.
    List,
    /// Delete a secret.
    Delete { name: String },
}

/// `bhatti image …` over the API (docs/images.md).
#[derive(Debug, Clone, Subcommand)]
pub enum ImageClientCommand {
    /// The images you can boot: tiers, yours, shared ones, the server's.
    List,
    /// One image: source, digest, size, owner, and its Env, WorkingDir,
    /// User, Entrypoint and Cmd.
    Inspect { name: String },
    /// Pull an OCI image from a registry as your image (a task; progress
    /// shown until it ends).
    Pull(ImagePullArgs),
    /// Import a `docker save` archive or an OCI-layout tar as your image.
    Import(ImageImportArgs),
    /// Save a sandbox's disk state as a new image of yours.
    Save {
        /// Sandbox name or id.
        sandbox: String,
        /// The new image's name.
        name: String,
    },
    /// Delete one of your images (its cached blobs stay).
    Delete { name: String },
    /// Share an image with every user (admin key).
    Share {
        name: String,
        /// Whose image (a user's name; default: yours).
        #[arg(long)]
        owner: Option<String>,
    },
    /// Stop sharing an image (admin key).
    Unshare {
        name: String,
        /// Whose image (a user's name; default: yours).
        #[arg(long)]
        owner: Option<String>,
    },
}

/// `bhatti image pull`.
#[derive(Debug, Clone, Args)]
pub struct ImagePullArgs {
    /// `[registry[:port]/]repository[:tag|@sha256:…]` (Docker Hub when no
    /// registry is named).
    pub reference: String,
    /// The local image name (default: the repository's last component).
    #[arg(long)]
    pub name: Option<String>,
    /// Speak plain HTTP to this registry (never the default).
    #[arg(long)]
    pub insecure: bool,
    /// Registry user; the password comes from $BHATTI_REGISTRY_PASSWORD or
    /// --password-stdin (never the command line).
    #[arg(long)]
    pub username: Option<String>,
    /// Read the password from stdin (one line).
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Send the bearer token in $BHATTI_REGISTRY_TOKEN instead of a user.
    #[arg(long, conflicts_with = "username")]
    pub token_env: bool,
}

/// `bhatti image import`.
#[derive(Debug, Clone, Args)]
pub struct ImageImportArgs {
    /// The archive: `docker save` output or a tar of an OCI image layout
    /// (gzip allowed).
    pub file: PathBuf,
    /// The image's name (default: the file name up to its first '.').
    #[arg(long)]
    pub name: Option<String>,
}

/// `bhatti image warm`.
#[derive(Debug, Clone, Args)]
pub struct WarmArgs {
    /// The image.
    pub image: String,
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory: MiB, or with a unit (512M, 2G).
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_mb)]
    pub memory: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Checkpoint a sandbox (a hot one pauses only while it is copied).
    Create {
        /// Sandbox name or id.
        sandbox: String,
        /// The checkpoint's name.
        name: String,
    },
    /// List your checkpoints.
    #[command(alias = "ls")]
    List,
    /// Show a checkpoint.
    Inspect { name: String },
    /// Roll a sandbox back to a checkpoint (its processes and files become
    /// the checkpoint's; it keeps its name and address).
    Restore {
        /// Sandbox name or id.
        sandbox: String,
        /// The checkpoint's name.
        checkpoint: String,
    },
    /// Delete a checkpoint (not while a sandbox made from it exists).
    #[command(alias = "delete")]
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create an empty volume.
    Create {
        name: String,
        /// MiB, or with a unit (10G); charged to your disk quota.
        #[arg(long, value_name = "SIZE", value_parser = parse_disk_mb)]
        size: u64,
    },
    /// List your volumes and where they are attached.
    #[command(alias = "ls")]
    List,
    /// Show a volume.
    Inspect { name: String },
    /// Grow a volume (no sandbox using it may run hot or warm).
    Grow {
        name: String,
        /// The new size: MiB, or with a unit (20G).
        #[arg(long, value_name = "SIZE", value_parser = parse_disk_mb)]
        size: u64,
    },
    /// Copy a volume into a new one of the same size (charged to your
    /// disk quota; not while a sandbox holding it read-write runs hot or warm).
    Clone {
        /// The volume to copy.
        source: String,
        /// The new volume's name.
        name: String,
    },
    /// Write a tar of a volume's files to FILE (`-` or none: standard
    /// output). Made in a short-lived VM; not while a sandbox holds the
    /// volume read-write.
    Export {
        name: String,
        #[arg(value_name = "FILE", default_value = "-")]
        file: String,
    },
    /// Replace a volume's files with those of a tar read from FILE (`-` or
    /// none: standard input). Not while any sandbox has it attached.
    Import {
        name: String,
        #[arg(value_name = "FILE", default_value = "-")]
        file: String,
    },
    /// Delete a volume and its data (not while a sandbox has it attached).
    #[command(alias = "delete")]
    Rm { name: String },
}

/// `--volume NAME:PATH[:ro|:rw]`.
pub fn parse_volume(s: &str) -> Result<api_types::VolumeAttach, String> {
    let (name, rest) = s
        .split_once(':')
        .ok_or_else(|| format!("expected NAME:/path[:ro], got {s:?}"))?;
    let (mount, read_only) = match rest.rsplit_once(':') {
        Some((m, "ro")) => (m, true),
        Some((m, "rw")) => (m, false),
        _ => (rest, false),
    };
    if name.is_empty() || !mount.starts_with('/') {
        return Err(format!(
            "expected NAME:/path[:ro] with an absolute path, got {s:?}"
        ));
    }
    Ok(api_types::VolumeAttach {
        name: name.to_string(),
        mount: mount.to_string(),
        read_only,
    })
}

/// `--file LOCAL:GUEST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub local: PathBuf,
    pub guest: String,
}

fn split_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err(format!("empty key in {s:?} (expected K=V)")),
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(format!("expected K=V, got {s:?}")),
    }
}

/// `K=V` for an environment variable: `K` a valid variable name, `V`
/// anything (including `=` and nothing).
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = split_kv(s)?;
    let mut chars = k.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "invalid variable name {k:?} (letters, digits and _, not starting with a digit)"
        ));
    }
    Ok((k, v))
}

/// `k=v` for a label (the server validates further).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    split_kv(s)
}

/// `LOCAL:GUEST`, split at the first `:` that starts an absolute guest path.
pub fn parse_file_spec(s: &str) -> Result<FileSpec, String> {
    let example = "e.g. ./app.py:/workspace/app.py";
    let Some(at) = s.find(":/") else {
        return Err(format!(
            "expected LOCAL:GUEST with an absolute guest path, got {s:?} ({example})"
        ));
    };
    let (local, guest) = (&s[..at], &s[at + 1..]);
    if local.is_empty() {
        return Err(format!("missing the local file in {s:?} ({example})"));
    }
    if guest.ends_with('/') {
        return Err(format!(
            "the guest path {guest:?} must name a file, not a directory ({example})"
        ));
    }
    if guest.split('/').any(|c| c == "..") {
        return Err(format!("the guest path {guest:?} may not contain `..`"));
    }
    Ok(FileSpec {
        local: PathBuf::from(local),
        guest: guest.to_string(),
    })
}

/// Memory in MiB: `512`, `512M`, `512MiB`, `2G`, `2GiB` (case-insensitive).
pub fn parse_memory_mb(s: &str) -> Result<u64, String> {
    parse_size_mb(s, "memory", false)
}

/// Disk size in MiB: as [`parse_memory_mb`], and `T`/`TiB` too.
pub fn parse_disk_mb(s: &str) -> Result<u64, String> {
    parse_size_mb(s, "disk", true)
}

fn parse_size_mb(s: &str, what: &str, tera: bool) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a size like 512M or 2G, got {s:?}"))?;
    let factor = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" if tera => 1024 * 1024,
        _ if tera => return Err(format!("unknown unit in {s:?} (use M, G or T)")),
        _ => return Err(format!("unknown unit in {s:?} (use M or G)")),
    };
    match n.checked_mul(factor) {
        Some(0) => Err(format!("{what} must be more than 0")),
        Some(mb) => Ok(mb),
        None => Err(format!("{s:?} is too large")),
    }
}

/// An octal file mode such as `644` or `0755`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("expected an octal mode like 0644, got {s:?}"))?;
    if m > 0o7777 {
        return Err(format!("{s:?} is not a file mode (at most 07777)"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn volume_specs() {
        let v = parse_volume("data:/data").unwrap();
        assert_eq!(
            (v.name.as_str(), v.mount.as_str(), v.read_only),
            ("data", "/data", false)
        );
        let v = parse_volume("data:/srv/x:ro").unwrap();
        assert_eq!((v.mount.as_str(), v.read_only), ("/srv/x", true));
        assert!(!parse_volume("data:/srv:rw").unwrap().read_only);
        for bad in ["data", ":/data", "data:rel", "data:"] {
            assert!(parse_volume(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("30m"), Ok(1800));
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        for bad in [
            "",
            "0",
            "0h",
            "h",
            "1y",
            "1.5h",
            "-1",
            "1 h",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn share_and_publish_shell_flags() {
        let parse = |args: &[&str]| {
            TestCli::try_parse_from(std::iter::once("bhatti").chain(args.iter().copied()))
        };
        assert!(parse(&["share", "dev", "--ttl", "1h", "--read-only"]).is_ok());
        assert!(parse(&["share", "dev", "--revoke"]).is_ok());
        assert!(parse(&["share", "dev", "--revoke", "--all"]).is_ok());
        assert!(
            parse(&["share", "dev", "--all"]).is_err(),
            "--all needs --revoke"
        );
        assert!(parse(&["share", "dev", "--list", "--ttl", "1h"]).is_err());
        assert!(parse(&["share", "dev", "--revoke", "x", "--read-only"]).is_err());
        assert!(parse(&["publish", "dev", "--shell", "--ttl", "2h"]).is_ok());
        assert!(parse(&["publish", "dev", "-p", "3000"]).is_ok());
        assert!(parse(&["publish", "dev"]).is_err(), "a port or --shell");
        assert!(parse(&["publish", "dev", "--shell", "-p", "3000"]).is_err());
        assert!(parse(&["publish", "dev", "-p", "3000", "--read-only"]).is_err());
    }

    #[derive(Debug, Parser)]
    #[command(name = "bhatti")]
    struct TestCli {
        #[command(flatten)]
        global: GlobalArgs,
        #[command(subcommand)]
        command: Command,
    }

    fn parse(args: &[&str]) -> Result<TestCli, clap::Error> {
        TestCli::try_parse_from(std::iter::once("bhatti").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        TestCli::command().debug_assert();
    }

    #[test]
    fn egress_flags() {
        let policy = |args: &[&str]| match parse(args).unwrap().command {
            Command::Create(a) => a.egress.policy(),
            Command::Edit { egress, .. } => egress.policy(),
            other => panic!("{other:?}"),
        };
        assert_eq!(policy(&["create"]), None);
        assert_eq!(
            policy(&["create", "--egress", "none"]),
            Some(api_types::Egress::None)
        );
        assert_eq!(
            policy(&["edit", "x", "--egress", "public"]),
            Some(api_types::Egress::Public)
        );
        assert_eq!(
            policy(&[
                "edit",
                "x",
                "--allow",
                "api.example.com",
                "--allow",
                "10.1.2.0/24"
            ]),
            Some(api_types::Egress::Allow(vec![
                "api.example.com".into(),
                "10.1.2.0/24".into()
            ]))
        );
        assert_eq!(policy(&["edit", "x", "--keep-hot", "true"]), None);
        let e = parse(&["create", "--egress", "sometimes"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid value 'sometimes'"), "{e}");
        let e = parse(&["create", "--egress", "none", "--allow", "10.0.0.0/8"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be used with"), "{e}");
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=1"), Ok(("A".into(), "1".into())));
        assert_eq!(parse_env("_x9="), Ok(("_x9".into(), "".into())));
        assert_eq!(parse_env("URL=a=b"), Ok(("URL".into(), "a=b".into())));
        assert!(parse_env("A").unwrap_err().contains("expected K=V"));
        assert!(parse_env("=1").unwrap_err().contains("empty key"));
        assert!(parse_env("1A=x")
            .unwrap_err()
            .contains("invalid variable name"));
        assert!(parse_env("A-B=x")
            .unwrap_err()
            .contains("invalid variable name"));
        assert_eq!(parse_label("team=ml"), Ok(("team".into(), "ml".into())));
        assert!(parse_label("=x").is_err());
    }

    #[test]
    fn file_specs() {
        assert_eq!(
            parse_file_spec("./app.py:/workspace/app.py"),
            Ok(FileSpec {
                local: "./app.py".into(),
                guest: "/workspace/app.py".into()
            })
        );
        // A colon inside the local name is kept: the split is at ":/".
        assert_eq!(
            parse_file_spec("a:b.txt:/tmp/x").unwrap().local,
            PathBuf::from("a:b.txt")
        );
        assert_eq!(parse_file_spec("/abs/f:/g").unwrap().guest, "/g");
        assert!(parse_file_spec("app.py")
            .unwrap_err()
            .contains("LOCAL:GUEST"));
        assert!(parse_file_spec("app.py:rel/x")
            .unwrap_err()
            .contains("absolute"));
        assert!(parse_file_spec(":/x")
            .unwrap_err()
            .contains("missing the local"));
        assert!(parse_file_spec("a:/x/").unwrap_err().contains("directory"));
        assert!(parse_file_spec("a:/x/../etc/passwd")
            .unwrap_err()
            .contains(".."));
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mb("512"), Ok(512));
        assert_eq!(parse_memory_mb("512M"), Ok(512));
        assert_eq!(parse_memory_mb("512mib"), Ok(512));
        assert_eq!(parse_memory_mb("2G"), Ok(2048));
        assert_eq!(parse_memory_mb("1GiB"), Ok(1024));
        assert!(parse_memory_mb("0").is_err());
        assert!(parse_memory_mb("2T").unwrap_err().contains("unknown unit"));
        assert!(parse_memory_mb("G").is_err());
        assert!(parse_memory_mb("-1").is_err());
        assert!(parse_memory_mb("99999999999999999999G").is_err());
        assert_eq!(parse_disk_mb("10G"), Ok(10240));
        assert_eq!(parse_disk_mb("1T"), Ok(1 << 20));
        assert_eq!(parse_disk_mb("0").unwrap_err(), "disk must be more than 0");
        assert!(parse_disk_mb("1P").unwrap_err().contains("use M, G or T"));
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0644"), Ok(0o644));
        assert_eq!(parse_mode("755"), Ok(0o755));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("17777").is_err());
    }

    #[test]
    fn thermal_commands() {
        assert!(matches!(
            parse(&["start", "a", "--force"]).unwrap().command,
            Command::Start { ref name, force: true } if name == "a"
        ));
        assert!(matches!(
            parse(&["stop", "a"]).unwrap().command,
            Command::Stop { ref name } if name == "a"
        ));
        assert!(matches!(
            parse(&["edit", "a", "--keep-hot", "false"])
                .unwrap()
                .command,
            Command::Edit {
                keep_hot: Some(false),
                ..
            }
        ));
        assert!(parse(&["edit", "a", "--keep-hot", "maybe"]).is_err());
    }

    #[test]
    fn create_collects_repeated_flags() {
        let c = parse(&[
            "create",
            "--name",
            "demo",
            "--memory",
            "1G",
            "--env",
            "A=1",
            "-e",
            "B=2",
            "--secret",
            "GH",
            "--file",
            "./x:/workspace/x",
            "--label",
            "k=v",
            "--keep-hot",
            "--init",
            "dockerd --log-level warn",
        ])
        .unwrap();
        let Command::Create(a) = c.command else {
            panic!("not create")
        };
        assert_eq!(a.name.as_deref(), Some("demo"));
        assert_eq!(a.memory, Some(1024));
        assert_eq!(
            a.env,
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(a.secrets, vec!["GH".to_string()]);
        assert_eq!(a.files[0].guest, "/workspace/x");
        assert_eq!(a.labels, vec![("k".into(), "v".into())]);
        assert!(a.keep_hot);
        assert_eq!(a.init.as_deref(), Some("dockerd --log-level warn"));
    }

    #[test]
    fn bad_values_are_usage_errors_that_name_the_flag() {
        let e = parse(&["create", "--file", "nocolon"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let msg = e.to_string();
        assert!(
            msg.contains("--file") && msg.contains("LOCAL:GUEST"),
            "{msg}"
        );
        let e = parse(&["create", "--env", "1X=y"]).unwrap_err();
        assert!(e.to_string().contains("invalid variable name"), "{e}");
        let e = parse(&["exec", "demo", "--timeout", "0", "--", "true"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn exec_takes_everything_after_the_name_or_dashes() {
        let c = parse(&[
            "exec",
            "demo",
            "--timeout",
            "5",
            "-e",
            "X=1",
            "--",
            "ls",
            "-la",
            "--json",
        ])
        .unwrap();
        let Command::Exec(a) = c.command else {
            panic!("not exec")
        };
        assert_eq!(a.cmd, ["ls", "-la", "--json"]);
        assert_eq!(a.timeout, Some(5));
        assert!(
            !c.global.json,
            "--json after the command belongs to the command"
        );
        let c = parse(&["exec", "demo", "uname", "-a"]).unwrap();
        let Command::Exec(a) = c.command else {
            panic!("not exec")
        };
        assert_eq!(a.cmd, ["uname", "-a"]);
        assert!(parse(&["exec", "demo"]).is_err(), "a command is required");
    }

    #[test]
    fn global_flags_go_anywhere() {
        let c = parse(&["list", "--json", "--url", "http://h:1"]).unwrap();
        assert!(c.global.json);
        assert_eq!(c.global.url.as_deref(), Some("http://h:1"));
        let c = parse(&["--token", "bht_x", "setup"]).unwrap();
        assert_eq!(c.global.token.as_deref(), Some("bht_x"));
    }

    #[test]
    fn shell_and_files_and_secrets() {
        assert!(parse(&["shell", "demo", "--new", "--session", "s1"]).is_err());
        assert!(parse(&["shell", "demo", "--steal"]).is_err());
        let c = parse(&["shell", "demo", "--session", "s1", "--steal"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Shell(ShellArgs { steal: true, .. })
        ));
        let c = parse(&["file", "write", "demo", "/workspace/a"]).unwrap();
        assert!(
            matches!(c.command, Command::File(FileCommand::Write { ref local, .. }) if local == "-")
        );
        let c = parse(&["secret", "set", "GH"]).unwrap();
        assert!(
            matches!(c.command, Command::Secret(SecretCommand::Set { ref value, .. }) if value == "-")
        );
        let c = parse(&[
            "file",
            "read",
            "demo",
            "/etc/hosts",
            "--offset",
            "3",
            "--max-bytes",
            "9",
        ])
        .unwrap();
        assert!(matches!(
            c.command,
            Command::File(FileCommand::Read {
                offset: Some(3),
                limit: None,
                max_bytes: Some(9),
                ..
            })
        ));
    }
}
