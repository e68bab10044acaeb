//! OCI images over the API (`/images…`, docs/images.md): whose they are,
//! which a user may boot, and the long work that makes them (pull, import,
//! save) as tasks (`GET /tasks/:id`).
//!
//! An API image's files live under `DATA/images/oci/<id>` (`i.` and 16 hex
//! digits), never under its name: two users' images of one name never
//! meet, and the row in the store (`images`) says whose it is, its name and
//! whether an admin shared it. A sandbox's spec (core's record) names the
//! id; its row and the API show the name. What a user means by a name:
//! a tier, else their own image, else the shared one, else an image the
//! admin CLI put on the server (`DATA/images/oci/<name>`, every user's).
//!
//! Every image counts in its owner's disk quota (its root filesystem's
//! size), and what a pull or import may download and unpack is bounded by
//! what is left of it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api_types::{ImageInfo, ImageRunConfig, PullImage, Task, TaskError, TaskProgress, TaskState};
use image::oci::{
    AddressPolicy, Credentials, Limits, OciError, OciImage, OciImages, PullOptions, Reference,
};
use image::Tier;
use store::{ImageRow, NewImage, UserRecord};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{internal, Service};
use crate::error::ApiError;
use crate::keys::random_hex;
use crate::state::blocking;

/// Tasks one user may run at once.
pub const MAX_RUNNING_TASKS: usize = 2;
/// Tasks all users together may run at once (each holds a disk's worth
/// of I/O and, for a save, a utility VM).
pub const MAX_RUNNING_TASKS_ALL: usize = 8;
/// Tasks (finished ones included) kept per user; the oldest finished go.
pub const MAX_KEPT_TASKS: usize = 16;
/// How long a finished task is kept.
pub const KEEP_FINISHED: Duration = Duration::from_secs(3600);
/// The prefix of an API image's directory name (never a name the API
/// or the admin CLI gives).
pub const ID_PREFIX: &str = "i.";

#[derive(Debug)]
struct Entry {
    user_id: String,
    task: Task,
    finished: Option<Instant>,
    /// Order of starting (the oldest finished go first).
    seq: u64,
}

/// The daemon's tasks, in memory (a restart forgets them; an unfinished
/// one leaves no image).
#[derive(Debug, Default)]
pub(super) struct Tasks {
    map: Mutex<HashMap<String, Entry>>,
    next: std::sync::atomic::AtomicU64,
}

impl Tasks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a running task of `user_id` making `target`: 409 while
    /// one of theirs makes the same, 429 past [`MAX_RUNNING_TASKS`].
    fn start(&self, user_id: &str, kind: &str, target: &str) -> Result<Task, ApiError> {
        let mut map = self.lock();
        map.retain(|_, e| e.finished.is_none_or(|f| f.elapsed() < KEEP_FINISHED));
        let mine: Vec<&Entry> = map.values().filter(|e| e.user_id == user_id).collect();
        if mine
            .iter()
            .any(|e| e.finished.is_none() && e.task.target == target)
        {
            return Err(ApiError::Conflict(format!(
                "image '{target}' is being made by another task of yours"
            )));
        }
        let running_all = map.values().filter(|e| e.finished.is_none()).count();
        if mine.iter().filter(|e| e.finished.is_none()).count() >= MAX_RUNNING_TASKS
            || running_all >= MAX_RUNNING_TASKS_ALL
        {
            return Err(ApiError::RateLimited {
                retry_after: Duration::from_secs(10),
            });
        }
        // Room for this one: the oldest finished of theirs go.
        let mut finished: Vec<(u64, String)> = map
            .iter()
            .filter(|(_, e)| e.user_id == user_id && e.finished.is_some())
            .map(|(id, e)| (e.seq, id.clone()))
            .collect();
        finished.sort();
        let excess = (mine.len() + 1).saturating_sub(MAX_KEPT_TASKS);
        for (_, id) in finished.into_iter().take(excess) {
            map.remove(&id);
        }
        let id = format!("task-{}", random_hex(8).map_err(internal)?);
        let task = Task {
            id: id.clone(),
            kind: kind.to_owned(),
            target: target.to_owned(),
            state: TaskState::Running,
            progress: TaskProgress {
                step: "starting".into(),
                ..Default::default()
            },
            result: None,
            failure: None,
            created_at: store::now_ms(),
            finished_at: None,
        };
        map.insert(
            id,
            Entry {
                user_id: user_id.to_owned(),
                task: task.clone(),
                finished: None,
                seq: self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            },
        );
        Ok(task)
    }

    fn progress(&self, id: &str, f: impl FnOnce(&mut TaskProgress)) {
        if let Some(e) = self.lock().get_mut(id) {
            f(&mut e.task.progress);
        }
    }

    fn finish(&self, id: &str, result: Result<ImageInfo, ApiError>) {
        let mut map = self.lock();
        let Some(e) = map.get_mut(id) else { return };
        e.finished = Some(Instant::now());
        e.task.finished_at = Some(store::now_ms());
        match result {
            Ok(info) => {
                e.task.state = TaskState::Succeeded;
                e.task.progress.step = "done".into();
                e.task.result = Some(info);
            }
            Err(err) => {
                e.task.state = TaskState::Failed;
                e.task.progress.step = "failed".into();
                e.task.failure = Some(TaskError {
                    status: err.status().as_u16(),
                    error: err.to_string(),
                });
            }
        }
    }

    /// A task of `user_id`'s (another user's is not found).
    fn get(&self, user_id: &str, id: &str) -> Option<Task> {
        self.lock()
            .get(id)
            .filter(|e| e.user_id == user_id)
            .map(|e| e.task.clone())
    }
}

/// The status an OCI failure answers: the caller's input (400), what the
/// registry lacks (404) or refuses (403), what it did wrong or could not
/// do (502), a budget passed (413), or the daemon's own trouble (500).
pub fn oci_error(e: OciError) -> ApiError {
    let msg = e.to_string();
    match e {
        OciError::Reference(_)
        | OciError::BadName { .. }
        | OciError::UnsafeEntry { .. }
        | OciError::Tar { .. }
        | OciError::BadArchive { .. }
        | OciError::NoPlatform { .. }
        | OciError::UnsupportedMediaType(_)
        | OciError::BadDigest(_)
        | OciError::Json { .. } => ApiError::BadRequest(msg),
        OciError::NotFound { .. } => ApiError::NotFound(msg),
        OciError::Unauthorized { .. } | OciError::AddressRefused { .. } => ApiError::Forbidden(msg),
        OciError::TooLarge { .. } => ApiError::PayloadTooLarge(msg),
        OciError::Unreachable { .. }
        | OciError::Registry { .. }
        | OciError::DigestMismatch { .. } => ApiError::BadGateway(msg),
        OciError::Io { .. } | OciError::Build(_) => ApiError::Internal(msg),
    }
}

fn run_config(img: &OciImage) -> ImageRunConfig {
    let c = &img.config;
    ImageRunConfig {
        env: c.env.clone().unwrap_or_default(),
        working_dir: c.working_dir.clone(),
        user: c.user.clone(),
        entrypoint: c.entrypoint.clone(),
        cmd: c.cmd.clone(),
    }
}

/// What a user means by an image name.
#[derive(Debug, Clone)]
pub(super) enum Visible {
    Tier(Tier),
    /// An API image (the user's own or a shared one).
    Api(ImageRow),
    /// Put on the server by the admin CLI.
    Server(OciImage),
}

impl Visible {
    /// The name core's spec carries (the directory under images/oci).
    pub(super) fn storage(&self) -> String {
        match self {
            Visible::Tier(t) => t.name().to_owned(),
            Visible::Api(r) => r.id.clone(),
            Visible::Server(i) => i.name.clone(),
        }
    }
}

impl Service {
    fn oci(&self) -> OciImages {
        OciImages::new(self.core.config().image_layout())
    }

    fn is_admin(&self, user: &UserRecord) -> bool {
        self.config.admins.contains(&user.name)
    }

    /// Images the admin CLI put on the server (not the API's own ids).
    fn server_images(&self) -> Vec<OciImage> {
        self.oci()
            .list()
            .into_iter()
            .filter(|i| !i.name.starts_with(ID_PREFIX))
            .collect()
    }

    fn built_tiers(&self) -> Vec<Tier> {
        let l = self.core.config().image_layout();
        Tier::ALL
            .into_iter()
            .filter(|t| l.rootfs(*t).is_file())
            .collect()
    }

    /// What `user` means by `name`, or 404 listing what they can use.
    pub(super) async fn visible_image(
        &self,
        user: &UserRecord,
        name: &str,
    ) -> Result<Visible, ApiError> {
        if let Some(t) = Tier::from_name(name) {
            return Ok(Visible::Tier(t));
        }
        let store = self.store.clone();
        let (uid, key) = (user.id.clone(), name.to_owned());
        if let Some(row) = blocking(move || store.visible_image(&uid, &key)).await? {
            return Ok(Visible::Api(row));
        }
        if !name.starts_with(ID_PREFIX) {
            if let Some(img) = self.oci().get(name) {
                return Ok(Visible::Server(img));
            }
        }
        let known: Vec<String> = self
            .list_images(user)
            .await?
            .into_iter()
            .map(|i| i.name)
            .collect();
        Err(ApiError::NotFound(format!(
            "unknown image '{name}' (images you can use: {})",
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        )))
    }

    /// The name core's spec carries for the image `user` calls `name`.
    pub(super) async fn image_storage(
        &self,
        user: &UserRecord,
        name: &str,
    ) -> Result<String, ApiError> {
        Ok(self.visible_image(user, name).await?.storage())
    }

    async fn owner_name(&self, user_id: &str) -> String {
        let store = self.store.clone();
        let uid = user_id.to_owned();
        blocking(move || store.user_by_id(&uid))
            .await
            .ok()
            .flatten()
            .map_or_else(|| user_id.to_owned(), |u| u.name)
    }

    async fn info(&self, v: &Visible, with_config: bool) -> ImageInfo {
        match v {
            Visible::Tier(t) => {
                let l = self.core.config().image_layout();
                let meta = std::fs::metadata(l.rootfs(*t)).ok();
                ImageInfo {
                    name: t.name().to_owned(),
                    kind: "tier".into(),
                    owner: None,
                    shared: true,
                    source: Some("bhatti image build".into()),
                    digest: None,
                    size_bytes: meta.as_ref().map_or(0, |m| m.len()),
                    created_at: meta
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_millis() as i64),
                    config: None,
                }
            }
            Visible::Api(r) => ImageInfo {
                name: r.name.clone(),
                kind: "oci".into(),
                owner: Some(self.owner_name(&r.user_id).await),
                shared: r.shared,
                source: Some(r.source.clone()),
                digest: Some(r.digest.clone()),
                size_bytes: r.bytes,
                created_at: r.created_at,
                config: if with_config {
                    self.oci().get(&r.id).map(|i| run_config(&i))
                } else {
                    None
                },
            },
            Visible::Server(i) => ImageInfo {
                name: i.name.clone(),
                kind: "server".into(),
                owner: None,
                shared: true,
                source: Some(i.source.clone()),
                digest: Some(i.digest.clone()),
                size_bytes: i.rootfs_bytes,
                created_at: (i.created_unix * 1000) as i64,
                config: with_config.then(|| run_config(i)),
            },
        }
    }

    /// `GET /images`: the built tiers, the user's images and the shared
    /// ones, and the server's, each name once (as a create would take it).
    pub async fn list_images(&self, user: &UserRecord) -> Result<Vec<ImageInfo>, ApiError> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for t in self.built_tiers() {
            seen.insert(t.name().to_owned());
            out.push(self.info(&Visible::Tier(t), false).await);
        }
        let store = self.store.clone();
        let uid = user.id.clone();
        let mut rows = blocking(move || store.visible_images(&uid)).await?;
        // The user's own first: theirs wins over a shared one of that name.
        rows.sort_by_key(|r| r.user_id != user.id);
        for r in rows {
            if seen.insert(r.name.clone()) {
                out.push(self.info(&Visible::Api(r), false).await);
            }
        }
        for i in self.server_images() {
            if seen.insert(i.name.clone()) {
                out.push(self.info(&Visible::Server(i), false).await);
            }
        }
        Ok(out)
    }

    /// `GET /images/:name`.
    pub async fn inspect_image(
        &self,
        user: &UserRecord,
        name: &str,
    ) -> Result<ImageInfo, ApiError> {
        let v = self.visible_image(user, name).await?;
        Ok(self.info(&v, true).await)
    }

    /// Bytes left of the user's disk quota.
    async fn disk_left(&self, user: &UserRecord) -> Result<u64, ApiError> {
        let store = self.store.clone();
        let uid = user.id.clone();
        let used = blocking(move || store.usage_of(&uid)).await?.disk_mb;
        Ok(user.max_disk_mb.saturating_sub(used) << 20)
    }

    /// Checks a new image's name: valid, not a tier's, not one the user
    /// has already (409).
    async fn check_new_name(&self, user: &UserRecord, name: &str) -> Result<(), ApiError> {
        image::oci::validate_name(name).map_err(oci_error)?;
        if name.starts_with(ID_PREFIX) {
            return Err(ApiError::BadRequest(format!(
                "invalid image name '{name}': names starting with '{ID_PREFIX}' are reserved"
            )));
        }
        // `/images/pull` and `/images/import` are routes.
        if matches!(name, "pull" | "import") {
            return Err(ApiError::BadRequest(format!(
                "invalid image name '{name}': reserved"
            )));
        }
        let store = self.store.clone();
        let (uid, key) = (user.id.clone(), name.to_owned());
        if blocking(move || store.own_image(&uid, &key))
            .await?
            .is_some()
        {
            return Err(ApiError::Conflict(format!(
                "you have an image named '{name}' already; delete it first or pick another name"
            )));
        }
        Ok(())
    }

    /// The budget of a new image: what is left of the disk quota (403
    /// when nothing is).
    async fn budget(&self, user: &UserRecord) -> Result<u64, ApiError> {
        let left = self.disk_left(user).await?;
        if left == 0 {
            return Err(ApiError::Forbidden(format!(
                "disk quota reached ({} MiB): no room for an image",
                user.max_disk_mb
            )));
        }
        Ok(left)
    }

    /// Records a built image as `user`'s (charged to their quota); the
    /// files go again if that fails.
    async fn register(
        &self,
        user: &UserRecord,
        name: &str,
        source: &str,
        img: &OciImage,
    ) -> Result<ImageInfo, ApiError> {
        let new = NewImage {
            id: img.name.clone(),
            user_id: user.id.clone(),
            name: name.to_owned(),
            source: source.to_owned(),
            digest: img.digest.clone(),
            bytes: img.rootfs_bytes,
        };
        let store = self.store.clone();
        match blocking(move || store.insert_image(&new)).await {
            Ok(row) => {
                self.volume_event(
                    user,
                    "image_created",
                    serde_json::json!({"image": name, "source": source}),
                )
                .await;
                Ok(self.info(&Visible::Api(row), true).await)
            }
            Err(e) => {
                let (oci, id) = (self.oci(), img.name.clone());
                let _ = tokio::task::spawn_blocking(move || oci.remove(&id)).await;
                Err(e)
            }
        }
    }

    /// Where a user's pull may connect: what a sandbox may reach (the
    /// default deny list and `[network] deny_cidrs`, less `allow_cidrs`),
    /// and for IPv6 only global unicast (its embedding and documentation
    /// ranges excepted); an IPv4-mapped address counts as its IPv4.
    fn pull_addresses(&self) -> Result<AddressPolicy, ApiError> {
        let (allow, deny) = self
            .config
            .network
            .egress_cidrs()
            .map_err(ApiError::Internal)?;
        let mut deny_v4: Vec<(net::Cidr, &'static str)> = net::DEFAULT_DENY
            .iter()
            .filter_map(|(c, why)| c.parse().ok().map(|c| (c, *why)))
            .collect();
        deny_v4.extend(
            deny.into_iter()
                .map(|c| (c, "denied by [network] deny_cidrs")),
        );
        Ok(AddressPolicy::new(move |ip| {
            let v4 = match ip {
                std::net::IpAddr::V4(a) => a,
                std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
                    Some(a) => a,
                    None => return ipv6_pullable(a),
                },
            };
            if allow.iter().any(|c| c.contains(v4)) {
                return Ok(());
            }
            match deny_v4.iter().find(|(c, _)| c.contains(v4)) {
                Some((c, why)) => Err(format!("in {c}: {why}")),
                None => Ok(()),
            }
        }))
    }

    /// At start: removes the files of users' images that have no row (their
    /// user was deleted, whose rows went by cascade, or the daemon stopped
    /// between a build and its row). Server images (named, not `i.…`) are
    /// the admin's and are left alone.
    pub(super) async fn remove_orphan_images(&self) {
        let store = self.store.clone();
        let rows = match blocking(move || store.all_images()).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "listing images to find orphans");
                return;
            }
        };
        let known: std::collections::HashSet<String> = rows.into_iter().map(|r| r.id).collect();
        let oci = self.oci();
        let _ = tokio::task::spawn_blocking(move || {
            let Ok(entries) = std::fs::read_dir(oci.dir()) else {
                return;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(ID_PREFIX) && !known.contains(&name) {
                    match oci.remove(&name) {
                        Ok(_) => tracing::info!(image = %name, "removed an image without an owner"),
                        Err(e) => {
                            tracing::warn!(image = %name, error = %e, "removing an orphan image")
                        }
                    }
                }
            }
        })
        .await;
    }

    fn new_id() -> Result<String, ApiError> {
        Ok(format!("{ID_PREFIX}{}", random_hex(8).map_err(internal)?))
    }

    /// `POST /images/pull`: checks what can be checked now (the reference,
    /// the name, the credentials, the quota: 4xx at once), then pulls in a
    /// task.
    pub async fn pull_image(
        self: &Arc<Self>,
        user: &UserRecord,
        body: PullImage,
    ) -> Result<Task, ApiError> {
        let reference =
            Reference::parse(&body.reference).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let name = body
            .name
            .clone()
            .unwrap_or_else(|| reference.default_name());
        self.check_new_name(user, &name).await?;
        let credentials = match (body.username, body.password, body.token) {
            (None, None, None) => Credentials::Anonymous,
            (Some(username), Some(password), None) => Credentials::Basic { username, password },
            (None, None, Some(t)) => Credentials::Token(t),
            _ => {
                return Err(ApiError::BadRequest(
                    "credentials are a username with a password, or a token".into(),
                ))
            }
        };
        let budget = self.budget(user).await?;
        let defaults = Limits::default();
        let addresses = self.pull_addresses()?;
        if let Err(why) = reference
            .api_host()
            .rsplit_once(':')
            .map_or(reference.api_host(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .map_or(Ok(()), |ip| addresses.check(ip))
        {
            return Err(ApiError::Forbidden(format!(
                "registry {} may not be pulled from: {why} (an admin may allow it in [network] allow_cidrs)",
                reference.registry
            )));
        }
        let opts = PullOptions {
            addresses: Some(addresses),
            insecure: body.insecure,
            credentials,
            limits: Limits {
                download_bytes: defaults.download_bytes.min(budget),
                unpacked_bytes: defaults.unpacked_bytes.min(budget),
            },
        };
        let task = self.image_tasks.start(&user.id, "pull", &name)?;
        let (this, user, tid) = (self.clone(), user.clone(), task.id.clone());
        let source = reference.to_string();
        tokio::spawn(async move {
            let result = this
                .pull_task(&user, &name, &source, reference, opts, &tid)
                .await;
            if let Err(e) = &result {
                tracing::info!(user = %user.name, image = %name, error = %e, "pull failed");
            }
            this.image_tasks.finish(&tid, result);
            this.collect_blobs().await;
        });
        Ok(task)
    }

    async fn pull_task(
        self: &Arc<Self>,
        user: &UserRecord,
        name: &str,
        source: &str,
        reference: Reference,
        opts: PullOptions,
        tid: &str,
    ) -> Result<ImageInfo, ApiError> {
        use image::oci::registry::PullEvent;
        let id = Self::new_id()?;
        let (oci, tasks, tid2, id2) = (self.oci(), self.clone(), tid.to_owned(), id.clone());
        let img = tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ApiError::Internal(format!("a runtime for the pull: {e}")))?;
            let mut puller = image::oci::Puller::new(oci, opts).map_err(oci_error)?;
            let (mut layers, mut seen) = (0usize, 0usize);
            let mut on_event = |e: PullEvent| {
                tasks.image_tasks.progress(&tid2, |p| match e {
                    PullEvent::Manifest {
                        layers: n, bytes, ..
                    } => {
                        layers = n;
                        p.bytes_total = bytes;
                        p.step = format!("downloading (0/{n} layers)");
                    }
                    PullEvent::Cached { size, .. } | PullEvent::Downloaded { size, .. } => {
                        if matches!(e, PullEvent::Cached { .. }) {
                            p.bytes_cached += size;
                        }
                        p.bytes_done += size;
                        seen += 1;
                        // The config blob comes first, then each layer.
                        p.step =
                            format!("downloading ({}/{layers} layers)", seen.saturating_sub(1));
                    }
                    PullEvent::Building => {
                        p.step = "unpacking and packing the root filesystem".into()
                    }
                })
            };
            rt.block_on(puller.pull(&reference, &id2, &mut on_event))
                .map_err(oci_error)
        })
        .await
        .map_err(internal)?;
        let img = match img {
            Ok(i) => i,
            Err(e) => {
                let (oci, id) = (self.oci(), id.clone());
                let _ = tokio::task::spawn_blocking(move || oci.remove(&id)).await;
                return Err(e);
            }
        };
        self.register(user, name, source, &img).await
    }

    /// `POST /images/import?name=`: the `size`-byte archive `body` (at most
    /// what is left of the disk quota, else 413) is written to the data
    /// directory, then imported in a task.
    pub async fn import_image<R: AsyncRead + Unpin>(
        self: &Arc<Self>,
        user: &UserRecord,
        name: &str,
        size: u64,
        mut body: R,
    ) -> Result<Task, ApiError> {
        self.check_new_name(user, name).await?;
        let left = self.budget(user).await?;
        if size > left {
            return Err(ApiError::PayloadTooLarge(format!(
                "an image archive may be at most what is left of your disk quota, {left} bytes; got {size}"
            )));
        }
        let build = self.core.config().image_layout().build_dir();
        tokio::fs::create_dir_all(&build).await.map_err(internal)?;
        let path = build.join(format!("upload-{}.tar", random_hex(8).map_err(internal)?));
        let upload = Upload(path.clone());
        let mut file = tokio::fs::File::create(&path).await.map_err(internal)?;
        let mut limited = (&mut body).take(size + 1);
        let written = tokio::io::copy(&mut limited, &mut file)
            .await
            .map_err(|e| ApiError::BadRequest(format!("reading the archive: {e}")))?;
        if written != size {
            return Err(ApiError::BadRequest(format!(
                "the body has {}{written} bytes, not the Content-Length's {size}",
                if written > size { "more than " } else { "" }
            )));
        }
        file.flush().await.map_err(internal)?;
        drop(file);
        let task = self.image_tasks.start(&user.id, "import", name)?;
        self.image_tasks.progress(&task.id, |p| {
            p.step = "unpacking".into();
            p.bytes_total = size;
        });
        let task = self.image_tasks.get(&user.id, &task.id).unwrap_or(task);
        let (this, user, tid, name) =
            (self.clone(), user.clone(), task.id.clone(), name.to_owned());
        tokio::spawn(async move {
            let result = async {
                let id = Self::new_id()?;
                let (oci, id2, p) = (this.oci(), id.clone(), upload.0.clone());
                let limits = Limits {
                    download_bytes: left,
                    unpacked_bytes: left,
                };
                let img = tokio::task::spawn_blocking(move || {
                    image::oci::import_archive(&oci, &p, &id2, limits)
                })
                .await
                .map_err(internal)?;
                drop(upload);
                match img {
                    Ok(img) => this.register(&user, &name, "import", &img).await,
                    Err(e) => {
                        let (oci, id) = (this.oci(), id.clone());
                        let _ = tokio::task::spawn_blocking(move || oci.remove(&id)).await;
                        Err(oci_error(e))
                    }
                }
            }
            .await;
            this.image_tasks.finish(&tid, result);
            this.collect_blobs().await;
        });
        Ok(task)
    }

    /// `GET /tasks/:id`: one of the caller's tasks.
    pub fn task(&self, user: &UserRecord, id: &str) -> Result<Task, ApiError> {
        self.image_tasks
            .get(&user.id, id)
            .ok_or_else(|| ApiError::NotFound(format!("no task '{id}'")))
    }

    /// What uses the image stored as `storage`: sandboxes (named when the
    /// caller's) and checkpoints of it.
    async fn image_users(
        &self,
        user: &UserRecord,
        storage: &str,
        name: &str,
    ) -> Result<Vec<String>, ApiError> {
        let store = self.store.clone();
        let rows = blocking(move || store.all_sandboxes()).await?;
        let mut mine = Vec::new();
        let mut others = 0;
        for r in rows {
            let spec_image = r
                .runtime
                .as_ref()
                .and_then(|rt| rt.pointer("/core/spec/image"))
                .and_then(|v| v.as_str().map(str::to_owned));
            let uses = match spec_image {
                Some(i) => i == storage,
                // No record yet (being created): by its shown name.
                None => r.image == name,
            };
            if uses {
                if r.user_id == user.id {
                    mine.push(format!("sandbox '{}'", r.name));
                } else {
                    others += 1;
                }
            }
        }
        let store = self.store.clone();
        let uid = user.id.clone();
        let cks = blocking(move || store.checkpoints(&uid)).await?;
        for c in cks.into_iter().filter(|c| c.image == name) {
            mine.push(format!("checkpoint '{}'", c.name));
        }
        if others > 0 {
            mine.push(format!("{others} sandboxes of other users"));
        }
        Ok(mine)
    }

    /// `DELETE /images/:name`: the caller's own image (an admin's: also
    /// a shared or a server image). 409 naming what uses it. The
    /// templates made of it go with it.
    pub async fn delete_image(&self, user: &UserRecord, name: &str) -> Result<(), ApiError> {
        let v = self.visible_image(user, name).await?;
        let admin = self.is_admin(user);
        match &v {
            Visible::Tier(_) => {
                return Err(ApiError::BadRequest(format!(
                    "'{name}' is a built-in tier; it cannot be deleted"
                )))
            }
            Visible::Api(r) if r.user_id != user.id && !admin => {
                return Err(ApiError::Forbidden(format!(
                    "image '{name}' is shared with you; only its owner or an admin can delete it"
                )))
            }
            Visible::Server(_) if !admin => {
                return Err(ApiError::Forbidden(format!(
                    "image '{name}' is the server's (the admin CLI's); only an admin can delete it"
                )))
            }
            _ => {}
        }
        let storage = v.storage();
        let users = self.image_users(user, &storage, name).await?;
        if !users.is_empty() {
            return Err(ApiError::Conflict(format!(
                "image '{name}' is in use by {}; destroy or delete them first",
                users.join(", ")
            )));
        }
        if let Visible::Api(r) = &v {
            let store = self.store.clone();
            let id = r.id.clone();
            blocking(move || store.delete_image(&id)).await?;
        }
        let (oci, templates) = (self.oci(), self.core.config().data_dir.join("templates"));
        tokio::task::spawn_blocking(move || {
            if let Ok(rd) = std::fs::read_dir(&templates) {
                for u in rd.flatten() {
                    let _ = std::fs::remove_dir_all(u.path().join(&storage));
                }
            }
            oci.remove(&storage)
        })
        .await
        .map_err(internal)?
        .map_err(oci_error)?;
        self.volume_event(user, "image_deleted", serde_json::json!({"image": name}))
            .await;
        self.collect_blobs().await;
        Ok(())
    }

    /// Removes cached blobs no image uses (after a delete, a task's end,
    /// and at start): what a failed pull downloaded or a deleted image
    /// held is not charged to anyone, so it may not stay. Skipped while
    /// a pull or an import runs; the last to end collects.
    pub(super) async fn collect_blobs(&self) {
        let oci = self.oci();
        match tokio::task::spawn_blocking(move || oci.collect_garbage()).await {
            Ok(Ok(Some((n, bytes)))) if n > 0 => {
                tracing::info!(blobs = n, bytes, "removed cached blobs no image uses")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "collecting unused blobs"),
            Err(e) => tracing::warn!(error = %e, "collecting unused blobs"),
        }
    }

    /// `POST|DELETE /images/:name/share[?owner=]`: an admin shares one
    /// user's image (theirs by default) with everyone, or stops.
    pub async fn share_image(
        &self,
        user: &UserRecord,
        name: &str,
        owner: Option<&str>,
        shared: bool,
    ) -> Result<ImageInfo, ApiError> {
        if !self.is_admin(user) {
            return Err(ApiError::Forbidden(
                "sharing an image needs an admin key".into(),
            ));
        }
        let store = self.store.clone();
        let owner_id = match owner {
            None => user.id.clone(),
            Some(o) => {
                let o2 = o.to_owned();
                blocking(move || store.user_by_name(&o2))
                    .await?
                    .ok_or_else(|| ApiError::NotFound(format!("no user '{o}'")))?
                    .id
            }
        };
        let store = self.store.clone();
        let key = name.to_owned();
        let row = blocking(move || store.own_image(&owner_id, &key))
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!("no image '{name}' of {}", owner.unwrap_or("yours")))
            })?;
        let store = self.store.clone();
        let row = blocking(move || store.set_image_shared(&row.id, shared)).await?;
        self.volume_event(
            user,
            if shared {
                "image_shared"
            } else {
                "image_unshared"
            },
            serde_json::json!({"image": name}),
        )
        .await;
        Ok(self.info(&Visible::Api(row), false).await)
    }
}

/// An uploaded archive (or a save's scratch directory), removed when
/// dropped.
struct Upload(PathBuf);

impl Drop for Upload {
    fn drop(&mut self) {
        if std::fs::remove_file(&self.0).is_err() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The longest the tar of a saved sandbox may run.
const SAVE_TAR_TIMEOUT: Duration = Duration::from_secs(3600);

/// The tar a save runs in its utility VM (as root, in `/`): one file
/// system (GNU tar; busybox's without the API mounts), owners by number,
/// without /tmp's content.
const SAVE_TAR: &str = "cd / && if tar --version 2>/dev/null | grep -q GNU; then \
    exec tar --one-file-system --numeric-owner --exclude=./tmp/* -cf - .; \
    else exec tar -cf - $(ls -A / | grep -vxE 'proc|sys|dev|run|tmp'); fi";

impl Service {
    /// `POST /sandboxes/:id/save`: checks the name, the quota and the
    /// sandbox now, then saves in a task ([`Self::save_task`]).
    pub async fn save_image(
        self: &Arc<Self>,
        user: &UserRecord,
        sandbox: &str,
        name: &str,
    ) -> Result<Task, ApiError> {
        self.check_new_name(user, name).await?;
        let budget = self.budget(user).await?;
        let row = self.row(user, sandbox).await?;
        let task = self.image_tasks.start(&user.id, "save", name)?;
        let (this, user, tid, name) =
            (self.clone(), user.clone(), task.id.clone(), name.to_owned());
        tokio::spawn(async move {
            let result = this.save_task(&user, &row, &name, budget, &tid).await;
            if let Err(e) = &result {
                tracing::info!(user = %user.name, image = %name, error = %e, "save failed");
            }
            this.image_tasks.finish(&tid, result);
            this.collect_blobs().await;
        });
        Ok(task)
    }

    /// A save: the sandbox's disk is copied while it is paused (after a
    /// `sync` in it); a utility VM boots its image over that copy with its
    /// agent as root and runs tar of `/` (the merged view); the tar, read
    /// from the guest like any guest output (bounded by the quota), is
    /// unpacked on the host by the OCI layer unpacker (its hostile-entry
    /// checks and budget) and packed as a new image with the source
    /// image's run settings. The host never mounts or parses the guest's
    /// file system.
    async fn save_task(
        self: &Arc<Self>,
        user: &UserRecord,
        row: &store::SandboxRow,
        name: &str,
        budget: u64,
        tid: &str,
    ) -> Result<ImageInfo, ApiError> {
        use agent_client::ExecEvent;
        use sha2::Digest;
        let progress = |step: &str| {
            let step = step.to_owned();
            self.image_tasks.progress(tid, |p| p.step = step);
        };
        progress("copying the sandbox's disk");
        let sid = self.find_awake(user, &row.id).await?;
        let record = self.core.get(&sid)?;
        let storage = record.spec.image.clone();
        let flush = proto::ExecRequest {
            argv: vec!["sync".into()],
            cwd: Some("/".into()),
            timeout_ms: Some(60_000),
            ..Default::default()
        };
        if let Err(e) = self.core.exec(&sid, flush).await {
            tracing::debug!(sandbox = %sid, error = %e, "sync before a save");
        }
        let build = self.core.config().image_layout().build_dir();
        let scratch = Upload(build.join(format!("save-{}", random_hex(8).map_err(internal)?)));
        let (dir, copy) = (scratch.0.clone(), scratch.0.join(image::disk::SANDBOX_DISK));
        {
            let (dir, copy, from) = (
                dir.clone(),
                copy.clone(),
                record.dir.join(image::disk::SANDBOX_DISK),
            );
            let _lock = self.locks.lock(&sid).await;
            self.core.pause(&sid).await?;
            let copied = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)?;
                vmm::snapshot::copy_sparse(&from, &copy).map_err(std::io::Error::other)
            })
            .await
            .map_err(internal)?;
            if let Err(e) = self.core.ensure_hot(&sid).await {
                tracing::warn!(sandbox = %sid, error = %e, "resuming after a save's copy");
            }
            copied.map_err(|e| ApiError::Internal(format!("copying the sandbox's disk: {e}")))?;
        }
        progress("booting a utility VM over the copy");
        let defaults = &self.config.defaults;
        let uid = bhatti_core::SandboxId::generate().map_err(internal)?;
        let mut spec = bhatti_core::SandboxSpec::new(
            format!("bhatti-save-{}", random_hex(4).map_err(internal)?),
            storage.clone(),
        );
        spec.cpus = 1;
        spec.memory_mb = u32::try_from(defaults.memory_mb).unwrap_or(256).min(512);
        spec.disk_mb = record.spec.disk_mb;
        spec.network_group = user.id.clone();
        spec.egress = net::Egress::None;
        spec.agent_as_root = true;
        let vm = UtilityVm {
            core: self.core.clone(),
            id: uid.clone(),
            done: false,
        };
        let core = self.core.clone();
        let (u2, s2, c2) = (uid.clone(), spec, copy.clone());
        tokio::spawn(async move { core.create_seeded(u2, s2, c2).await })
            .await
            .map_err(internal)??;
        // The tier's rule (commands as uid 1000 when it exists) becomes
        // the saved image's User.
        let tier_user = if Tier::from_name(&storage).is_some() {
            let probe = proto::ExecRequest {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "grep -q '^[^:]*:[^:]*:1000:' /etc/passwd".into(),
                ],
                cwd: Some("/".into()),
                timeout_ms: Some(30_000),
                ..Default::default()
            };
            matches!(self.core.exec(&uid, probe).await, Ok(o) if o.exit.code == 0)
        } else {
            false
        };
        progress("reading the sandbox's files");
        let req = proto::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), SAVE_TAR.into()],
            cwd: Some("/".into()),
            timeout_ms: Some(SAVE_TAR_TIMEOUT.as_millis() as u64),
            ..Default::default()
        };
        let tar_path = dir.join("root.tar");
        let mut exec = self
            .core
            .exec_stream(&uid, req)
            .await
            .map_err(super::guest_error)?;
        let mut file = tokio::fs::File::create(&tar_path).await.map_err(internal)?;
        let (mut bytes, mut hash, mut stderr) = (0u64, sha2::Sha256::new(), Vec::new());
        // The host's own deadline: the utility VM runs the sandbox's files
        // as root, so the guest-side timeout is not to be relied on.
        let deadline = tokio::time::Instant::now() + SAVE_TAR_TIMEOUT + Duration::from_secs(30);
        loop {
            let event = tokio::time::timeout_at(deadline, exec.next())
                .await
                .map_err(|_| {
                    ApiError::BadGateway(format!(
                        "the tar of the sandbox's files did not end within {SAVE_TAR_TIMEOUT:?}"
                    ))
                })?;
            match event.map_err(super::guest_error)? {
                ExecEvent::Stdout(d) => {
                    bytes += d.len() as u64;
                    if bytes > budget {
                        return Err(ApiError::PayloadTooLarge(format!(
                            "the sandbox's files are more than what is left of your disk quota ({budget} bytes)"
                        )));
                    }
                    hash.update(&d);
                    file.write_all(&d).await.map_err(internal)?;
                    self.image_tasks.progress(tid, |p| p.bytes_done = bytes);
                }
                ExecEvent::Stderr(d) => {
                    let room = 4096usize.saturating_sub(stderr.len());
                    stderr.extend_from_slice(&d[..d.len().min(room)]);
                }
                ExecEvent::Exit(e) => {
                    if e.code != 0 {
                        return Err(ApiError::BadGateway(format!(
                            "tar of the sandbox's files failed (exit {}): {}",
                            e.code,
                            String::from_utf8_lossy(&stderr).trim()
                        )));
                    }
                    break;
                }
            }
        }
        file.flush().await.map_err(internal)?;
        drop(file);
        vm.finish().await;
        progress("unpacking and packing the root filesystem");
        let digest = format!("sha256:{:x}", hash.finalize());
        let mut config = image::ImageStore::new(self.core.config().image_layout())
            .resolve(&storage)
            .ok()
            .and_then(|r| r.run_config)
            .unwrap_or_default();
        if tier_user {
            config.user = Some("1000".into());
        }
        let blob = image::oci::spec::ImageConfigBlob {
            architecture: self.core.config().image_layout().arch().name().to_owned(),
            os: "linux".into(),
            config: Some(config),
        };
        let id = Self::new_id()?;
        let (oci, id2, source) = (self.oci(), id.clone(), format!("save:{}", row.name));
        let (src2, d2) = (source.clone(), digest.clone());
        let built = tokio::task::spawn_blocking(move || {
            oci.build(
                &id2,
                image::oci::Origin {
                    source: &src2,
                    digest: &d2,
                    config_digest: None,
                },
                &blob,
                &[(d2.clone(), tar_path)],
                budget,
            )
        })
        .await
        .map_err(internal)?;
        drop(scratch);
        match built {
            Ok(img) => self.register(user, name, &source, &img).await,
            Err(e) => {
                let (oci, id) = (self.oci(), id.clone());
                let _ = tokio::task::spawn_blocking(move || oci.remove(&id)).await;
                Err(oci_error(e))
            }
        }
    }
}

/// A save's utility VM, destroyed when finished or dropped.
struct UtilityVm {
    core: bhatti_core::SandboxManager,
    id: bhatti_core::SandboxId,
    done: bool,
}

impl UtilityVm {
    async fn finish(mut self) {
        self.done = true;
        if let Err(e) = self.core.destroy(&self.id).await {
            tracing::debug!(sandbox = %self.id, error = %e, "ending a save's utility VM");
        }
    }
}

impl Drop for UtilityVm {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (core, id) = (self.core.clone(), self.id.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = core.destroy(&id).await;
            });
        }
    }
}

/// An IPv6 address a pull may reach: global unicast (`2000::/3`) but the
/// documentation range and the prefixes that embed IPv4 addresses (6to4,
/// Teredo), which could lead back into private IPv4 space.
fn ipv6_pullable(a: std::net::Ipv6Addr) -> Result<(), String> {
    let s = a.segments();
    let global = s[0] & 0xe000 == 0x2000;
    let embeds_or_doc = s[0] == 0x2002 || (s[0] == 0x2001 && (s[1] == 0 || s[1] == 0x0db8));
    if global && !embeds_or_doc {
        Ok(())
    } else {
        Err("not a global unicast IPv6 address".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> ImageInfo {
        ImageInfo {
            name: name.into(),
            kind: "oci".into(),
            owner: None,
            shared: false,
            source: None,
            digest: None,
            size_bytes: 0,
            created_at: 0,
            config: None,
        }
    }

    #[test]
    fn tasks_are_their_users_bounded_and_do_not_pile_up() {
        let t = Tasks::default();
        let a = t.start("u1", "pull", "x").unwrap();
        // The same target again while it runs: 409; a third running: 429.
        assert!(matches!(
            t.start("u1", "pull", "x"),
            Err(ApiError::Conflict(_))
        ));
        let b = t.start("u1", "import", "y").unwrap();
        assert!(matches!(
            t.start("u1", "pull", "z"),
            Err(ApiError::RateLimited { .. })
        ));
        // Another user's tasks are theirs.
        assert!(t.get("u2", &a.id).is_none());
        t.start("u2", "pull", "x").unwrap();
        t.progress(&a.id, |p| p.bytes_done = 7);
        assert_eq!(t.get("u1", &a.id).unwrap().progress.bytes_done, 7);
        t.finish(&a.id, Ok(info("x")));
        t.finish(&b.id, Err(ApiError::BadGateway("registry down".into())));
        let a = t.get("u1", &a.id).unwrap();
        assert_eq!(a.state, TaskState::Succeeded);
        assert_eq!(a.result.unwrap().name, "x");
        let b = t.get("u1", &b.id).unwrap();
        assert_eq!(b.state, TaskState::Failed);
        assert_eq!(
            b.failure,
            Some(TaskError {
                status: 502,
                error: "registry down".into()
            })
        );
        // Finished ones make room: at most MAX_KEPT_TASKS kept per user.
        let mut ids = Vec::new();
        for i in 0..(MAX_KEPT_TASKS + 4) {
            let x = t.start("u1", "pull", &format!("n{i}")).unwrap();
            t.finish(&x.id, Ok(info("n")));
            ids.push(x.id);
        }
        let kept = t.lock().values().filter(|e| e.user_id == "u1").count();
        assert_eq!(kept, MAX_KEPT_TASKS);
        assert!(t.get("u1", ids.last().unwrap()).is_some());
        assert!(t.get("u1", &a.id).is_none(), "the oldest finished went");

        // All users together run at most MAX_RUNNING_TASKS_ALL.
        let t = Tasks::default();
        for i in 0..MAX_RUNNING_TASKS_ALL {
            t.start(&format!("user{i}"), "pull", "x").unwrap();
        }
        assert!(matches!(
            t.start("another", "pull", "x"),
            Err(ApiError::RateLimited { .. })
        ));
    }

    #[test]
    fn oci_errors_map_to_statuses() {
        use axum::http::StatusCode as S;
        let s = |e| oci_error(e).status();
        assert_eq!(
            s(OciError::NotFound {
                registry: "r".into(),
                what: "tag".into()
            }),
            S::NOT_FOUND
        );
        assert_eq!(
            s(OciError::Unreachable {
                registry: "r".into(),
                message: "refused".into()
            }),
            S::BAD_GATEWAY
        );
        assert_eq!(
            s(OciError::UnsafeEntry {
                path: "../x".into(),
                reason: "r"
            }),
            S::BAD_REQUEST
        );
        assert_eq!(
            s(OciError::TooLarge {
                what: "layer".into(),
                limit: 1
            }),
            S::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            s(OciError::Unauthorized {
                registry: "r".into(),
                message: "no".into()
            }),
            S::FORBIDDEN
        );
    }
}
