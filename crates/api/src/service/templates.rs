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
            match this.warm_template(&user, &image, warm).await {
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
        let key = dir.display().to_string();
        if !self.warming().insert(key.clone()) {
            return Err(ApiError::Conflict(format!(
                "the template of {image} with {} CPUs and {memory} MiB is being made",
                spec.cpus
            )));
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
            image: spec.image.clone(),
            cpus: spec.cpus,
            memory_mb: u64::from(spec.memory_mb),
            disk_size_mb: spec.disk_mb.unwrap_or(self.config.defaults.disk_mb),
            bytes: capture.bytes,
            created_at: capture.meta.taken_unix_ms as i64,
        })
    }

    fn warming(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.warming.lock().unwrap_or_else(|p| p.into_inner())
    }
}
