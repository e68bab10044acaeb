//! Templates: creates that restore instead of boot (`docs/state.md`).
//!
//! A template is a capture of an image booted once with a given shape
//! (CPUs, memory, the default disk), its agent ready. Each user has their
//! own (`DATA/templates/<user-id>/<image>/<cpus>x<memory>/`): a restored
//! VMM opens its memory image read-write (QEMU 7 cannot map a read-only
//! file privately), so no two tenants' VMMs ever share one. A template is
//! made by `POST /images/:name/templates` (`bhatti image warm`), or after
//! a user's first boot of that image and shape when `auto_templates` is on.
//! A create of a matching image and shape, carrying nothing a boot must
//! apply, restores from it unless it asks `"boot": "fresh"`.

use std::path::PathBuf;
use std::sync::Arc;

use api_types::{BootMode, CreateSandbox, Template, WarmImage};
use bhatti_core::{Capture, SandboxId, SandboxSpec};
use store::UserRecord;

use super::{internal, Service};
use crate::state::blocking;

/// Templates one user may keep (each costs the disk its guest touched).
pub const MAX_TEMPLATES_PER_USER: usize = 8;

/// What a sandbox made from a template records as its origin.
pub(super) fn template_origin(image: &str, cpus: u32, memory_mb: u32) -> String {
    format!("template:{image}/{cpus}x{memory_mb}")
}

/// `<cpus>x<memory_mb>` parsed.
fn parse_shape(shape: &str) -> Option<(u32, u32)> {
    let (c, m) = shape.split_once('x')?;
    Some((c.parse().ok()?, m.parse().ok()?))
}
use crate::error::{error_chain, ApiError};
use crate::keys::random_hex;

impl Service {
    fn templates_root(&self, user_id: &str) -> PathBuf {
        self.core.config().data_dir.join("templates").join(user_id)
    }

    fn template_dir(&self, user_id: &str, image: &str, cpus: u32, memory_mb: u32) -> PathBuf {
        self.templates_root(user_id)
            .join(image)
            .join(format!("{cpus}x{memory_mb}"))
    }

    /// The caller's template for `spec`, when the create may use one.
    pub(super) async fn template_for(
        &self,
        user: &UserRecord,
        spec: &SandboxSpec,
        body: &CreateSandbox,
    ) -> Option<Capture> {
        if body.boot == Some(BootMode::Fresh) || !self.template_eligible(spec, body) {
            return None;
        }
        let dir = self.template_dir(&user.id, &spec.image, spec.cpus, spec.memory_mb);
        let engine = self.core.engine().kind;
        let kernel = self.core.kernel_release(&spec.image).ok()?;
        let capture = tokio::task::spawn_blocking(move || Capture::open(&dir, engine))
            .await
            .ok()?
            .map_err(|e| {
                if !matches!(&e, bhatti_core::CoreError::Capture { reason, .. } if reason.contains("No such file"))
                {
                    tracing::warn!(error = %error_chain(&e), "a template that does not open; booting");
                }
            })
            .ok()?;
        (capture.meta.kernel_release == kernel).then_some(capture)
    }

    /// Whether a create carries nothing that only a boot applies.
    fn template_eligible(&self, spec: &SandboxSpec, body: &CreateSandbox) -> bool {
        body.env.is_empty()
            && body.secrets.is_empty()
            && body.files.is_empty()
            && body.init.is_none()
            && body.volumes.is_empty()
            && spec.disk_mb == Some(self.config.defaults.disk_mb)
    }

    /// After a boot that a template could have saved: make one in the
    /// background (when `auto_templates` is on and none is being made).
    pub(super) fn warm_later(
        self: &Arc<Self>,
        user: &UserRecord,
        spec: &SandboxSpec,
        body: &CreateSandbox,
    ) {
        if !self.config.defaults.auto_templates
            || body.boot == Some(BootMode::Fresh)
            || !self.template_eligible(spec, body)
        {
            return;
        }
        let dir = self.template_dir(&user.id, &spec.image, spec.cpus, spec.memory_mb);
        if dir.exists() {
            return;
        }
        let (this, user) = (self.clone(), user.clone());
        let warm = WarmImage {
            cpus: Some(spec.cpus),
            memory_mb: Some(u64::from(spec.memory_mb)),
        };
        let image = spec.image.clone();
        tokio::spawn(async move {
            match this.warm_stored(&user, &image, warm).await {
                Ok(t) => {
                    tracing::info!(user = %user.name, image = %t.image, "template made on first use")
                }
                Err(ApiError::Conflict(_)) => {}
                Err(e) => {
                    tracing::warn!(user = %user.name, error = %e, "making a template on first use")
                }
            }
        });
    }

    /// Boots `image` with the shape asked (the defaults otherwise) under a
    /// sandbox of its own, captures it as the caller's template (replacing
    /// theirs of that shape) and destroys it. A 409 while the same
    /// template is being made.
    pub async fn warm_template(
        self: &Arc<Self>,
        user: &UserRecord,
        image: &str,
        body: WarmImage,
    ) -> Result<Template, ApiError> {
        crate::validate::name("image", image)?;
        let storage = self.image_storage(user, image).await?;
        let mut made = self.warm_stored(user, &storage, body).await?;
        made.image = image.to_owned();
        Ok(made)
    }

    /// [`Self::warm_template`] of the image core knows as `image` (an API
    /// image's directory, `i.…`; a tier's or server image's name).
    async fn warm_stored(
        self: &Arc<Self>,
        user: &UserRecord,
        image: &str,
        body: WarmImage,
    ) -> Result<Template, ApiError> {
        let d = &self.config.defaults;
        let mut spec = SandboxSpec::new(
            format!("template-{}", random_hex(3).map_err(internal)?),
            image,
        );
        spec.cpus = body.cpus.unwrap_or(d.cpus);
        let memory = body.memory_mb.unwrap_or(d.memory_mb);
        spec.memory_mb = u32::try_from(memory)
            .map_err(|_| ApiError::BadRequest(format!("memory_mb {memory} is absurd")))?;
        spec.disk_mb = Some(d.disk_mb);
        spec.network_group = user.id.clone();
        spec.validate(&self.core.config().limits)
            .map_err(|e| ApiError::BadRequest(error_chain(&e)))?;
        self.core
            .kernel_release(image)
            .map_err(|e| ApiError::NotFound(error_chain(&e)))?;
        // The user's quotas apply to the boot that makes it.
        if spec.cpus > user.max_cpus || memory > user.max_memory_mb {
            return Err(ApiError::Forbidden(format!(
                "a template of {} CPUs and {memory} MiB is past your quota ({} CPUs, {} MiB)",
                spec.cpus, user.max_cpus, user.max_memory_mb
            )));
        }
        let dir = self.template_dir(&user.id, image, spec.cpus, spec.memory_mb);
        if !dir.exists() && self.template_dirs(&user.id).len() >= MAX_TEMPLATES_PER_USER {
            return Err(ApiError::Forbidden(format!(
                "template quota reached: {MAX_TEMPLATES_PER_USER} kept; delete one first"
            )));
        }
        let key = dir.display().to_string();
        {
            // One at a time per user: the boot that makes one is not
            // charged to the sandbox quota, so it must not multiply.
            let mut warming = self.warming();
            let root = format!("{}/", self.templates_root(&user.id).display());
            if let Some(busy) = warming.iter().find(|k| k.starts_with(&root)) {
                let what = if *busy == key {
                    "this template"
                } else {
                    "another of your templates"
                };
                return Err(ApiError::Conflict(format!(
                    "{what} is being made (the template of {image} with {} CPUs and {memory} MiB waits for it)",
                    spec.cpus
                )));
            }
            warming.insert(key.clone());
        }
        let this = self.clone();
        let made = tokio::spawn(async move {
            let result = this.warm_into(&dir, spec).await;
            this.warming().remove(&key);
            result
        })
        .await
        .map_err(internal)??;
        Ok(made)
    }

    async fn warm_into(
        &self,
        dir: &std::path::Path,
        spec: SandboxSpec,
    ) -> Result<Template, ApiError> {
        let parent = dir
            .parent()
            .ok_or_else(|| ApiError::Internal("template path".into()))?;
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| ApiError::Internal(format!("{}: {e}", parent.display())))?;
        }
        let tmp = parent.join(format!(".new-{}", random_hex(4).map_err(internal)?));
        let id = SandboxId::generate().map_err(internal)?;
        let started = std::time::Instant::now();
        let capture = self.core.capture_fresh(id, spec, &tmp).await?;
        // Replaced whole: a VM restored from the old one keeps the memory
        // image it mapped.
        let (d, t) = (dir.to_path_buf(), tmp.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            match std::fs::remove_dir_all(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            std::fs::rename(&t, &d)?;
            vmm::snapshot::relocate_capture(&d.join(bhatti_core::CAPTURE_SNAPSHOT))
                .map_err(std::io::Error::other)
        })
        .await
        .map_err(internal)?
        .map_err(|e| ApiError::Internal(format!("installing the template: {e}")))?;
        let spec = &capture.meta.spec;
        tracing::info!(
            image = %spec.image,
            cpus = spec.cpus,
            memory_mb = spec.memory_mb,
            took_ms = started.elapsed().as_millis() as u64,
            "template made"
        );
        Ok(Template {
            shape: format!("{}x{}", spec.cpus, spec.memory_mb),
            image: spec.image.clone(),
            cpus: spec.cpus,
            memory_mb: u64::from(spec.memory_mb),
            disk_size_mb: spec.disk_mb.unwrap_or(self.config.defaults.disk_mb),
            bytes: capture.bytes,
            created_at: capture.meta.taken_unix_ms as i64,
        })
    }

    /// Every template directory of a user (`<image>/<shape>`).
    fn template_dirs(&self, user_id: &str) -> Vec<(String, String, PathBuf)> {
        let mut out = Vec::new();
        let Ok(images) = std::fs::read_dir(self.templates_root(user_id)) else {
            return out;
        };
        for image in images.flatten() {
            let Ok(shapes) = std::fs::read_dir(image.path()) else {
                continue;
            };
            for shape in shapes.flatten() {
                let name = shape.file_name().to_string_lossy().into_owned();
                if parse_shape(&name).is_some() {
                    let img = image.file_name().to_string_lossy().into_owned();
                    out.push((img, name, shape.path()));
                }
            }
        }
        out.sort();
        out
    }

    /// The caller's templates of `image`.
    pub async fn list_templates(
        &self,
        user: &UserRecord,
        image: &str,
    ) -> Result<Vec<Template>, ApiError> {
        crate::validate::name("image", image)?;
        let shown = image;
        let storage = self.image_storage(user, image).await?;
        let image = storage.as_str();
        let engine = self.core.engine().kind;
        let mut out = Vec::new();
        for (img, shape, dir) in self.template_dirs(&user.id) {
            if img != image {
                continue;
            }
            let opened = tokio::task::spawn_blocking(move || Capture::open(&dir, engine))
                .await
                .map_err(internal)?;
            let Ok(c) = opened else { continue };
            let spec = &c.meta.spec;
            out.push(Template {
                shape,
                image: shown.to_owned(),
                cpus: spec.cpus,
                memory_mb: u64::from(spec.memory_mb),
                disk_size_mb: spec.disk_mb.unwrap_or(self.config.defaults.disk_mb),
                bytes: c.bytes,
                created_at: c.meta.taken_unix_ms as i64,
            });
        }
        Ok(out)
    }

    /// Deletes the caller's template of `image` with `shape`
    /// (`<cpus>x<memory_mb>`); a 409 while a sandbox made from it exists.
    pub async fn delete_template(
        &self,
        user: &UserRecord,
        image: &str,
        shape: &str,
    ) -> Result<(), ApiError> {
        // The name becomes a path: a name, never `..` or a `/`.
        crate::validate::name("image", image)?;
        let (cpus, memory) = parse_shape(shape).ok_or_else(|| {
            ApiError::BadRequest(format!("'{shape}' is not a shape: <cpus>x<memory_mb>"))
        })?;
        // Core's name of the image (an API image's directory); the name
        // as given when it resolves no more.
        let storage = self
            .image_storage(user, image)
            .await
            .unwrap_or_else(|_| image.to_owned());
        let dir = self.template_dir(&user.id, &storage, cpus, memory);
        if !dir.is_dir() {
            return Err(ApiError::NotFound(format!(
                "no template of '{image}' with shape {shape}"
            )));
        }
        let (store, uid, origin) = (
            self.store.clone(),
            user.id.clone(),
            template_origin(&storage, cpus, memory),
        );
        let users = blocking(move || store.sandboxes_made_from(&uid, &origin)).await?;
        if !users.is_empty() {
            return Err(ApiError::Conflict(format!(
                "the template is in use by sandbox(es) made from it: {}",
                users.join(", ")
            )));
        }
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
            .await
            .map_err(internal)?
            .map_err(|e| ApiError::Internal(format!("removing the template: {e}")))
    }

    fn warming(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.warming.lock().unwrap_or_else(|p| p.into_inner())
    }
}
