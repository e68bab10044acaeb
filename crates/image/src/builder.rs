//! [`ImageBuilder`]: builds the kernel, the initramfs and the rootfs tiers
//! into a data directory, skipping any artifact whose manifest says it is
//! current, and reporting progress through [`ImageProgress`].
//!
//! Everything here blocks (subprocesses, file I/O): async callers run it in
//! `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::apt::Apt;
use crate::error::{io, Error, Result};
use crate::fsutil::Staging;
use crate::initramfs::{write_initramfs, InitramfsSpec, GUEST_MODULES};
use crate::kernel::{build_kernel, installed_release, kernel_inputs, kernel_package};
use crate::layout::{Arch, Layout, Tier, MANIFEST};
use crate::manifest::{sha256_file, Inputs, Manifest};
use crate::mirror::host_debian_sources;
use crate::rootfs::{
    browser_inputs, docker_inputs, minimal_inputs, pack_rootfs, stage_debian, stage_tiny,
    tiny_inputs, Extra, BUSYBOX_PACKAGE, MINIMAL_SUITE,
};

const INITRAMFS_RECIPE: u32 = 1;

/// apt for `arch`'s packages: the host's, or a foreign architecture's.
fn apt_for(arch: Arch) -> Apt {
    if arch.is_host() {
        Apt::host()
    } else {
        Apt::foreign(arch.name())
    }
}

/// One step of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Fetch and unpack the kernel.
    Kernel,
    /// Write the initramfs.
    Initramfs,
    /// Build a rootfs tier.
    Rootfs(Tier),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Kernel => f.write_str("kernel"),
            Step::Initramfs => f.write_str("initramfs"),
            Step::Rootfs(t) => write!(f, "rootfs {t}"),
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The artifact was (re)built.
    Built,
    /// The manifest matched; nothing was done.
    Cached,
}

/// A progress notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProgressEvent {
    /// A step began.
    Started(Step),
    /// Something worth a progress line happened within a step.
    Detail(Step, String),
    /// A step ended.
    Finished(StepReport),
}

/// Receives progress from [`ImageBuilder`] (the CLI prints lines).
pub trait ImageProgress: Send + Sync {
    /// Called for every event, in order, on the building thread.
    fn on_event(&self, event: &ProgressEvent);
}

/// Progress sink that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ImageProgress for NoProgress {
    fn on_event(&self, _: &ProgressEvent) {}
}

/// Which rootfs tiers to build (kernel and initramfs are always ensured).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// One tier.
    Tier(Tier),
    /// Every tier.
    All,
}

impl From<Tier> for Selection {
    fn from(t: Tier) -> Self {
        Selection::Tier(t)
    }
}

/// Options of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// The lohar binary to install as `/init` (static).
    pub lohar: PathBuf,
    /// Rebuild even when manifests match.
    pub force: bool,
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// Which step.
    pub step: Step,
    /// Built or cached.
    pub outcome: Outcome,
    /// Wall time.
    pub elapsed: Duration,
    /// One line about the result.
    pub summary: String,
}

/// The result of a build.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BuildReport {
    /// Steps in execution order.
    pub steps: Vec<StepReport>,
}

/// Builds images into a [`Layout`].
pub struct ImageBuilder {
    layout: Layout,
    apt: Apt,
    progress: Box<dyn ImageProgress>,
}

impl std::fmt::Debug for ImageBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageBuilder")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl ImageBuilder {
    /// A builder writing into `layout`, with no progress output.
    /// The layout's architecture decides which Debian packages are used
    /// (a foreign one must have been added with `dpkg --add-architecture`).
    pub fn new(layout: Layout) -> Self {
        let arch = layout.arch();
        Self {
            layout,
            apt: apt_for(arch),
            progress: Box::new(NoProgress),
        }
    }

    /// Reports progress to `progress`.
    pub fn with_progress(mut self, progress: impl ImageProgress + 'static) -> Self {
        self.progress = Box::new(progress);
        self
    }

    /// The layout built into.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Ensures the kernel, the initramfs and the selected tiers are built.
    pub fn build(
        &self,
        selection: impl Into<Selection>,
        opts: &BuildOptions,
    ) -> Result<BuildReport> {
        let tiers: Vec<Tier> = match selection.into() {
            Selection::Tier(t) => vec![t],
            Selection::All => Tier::ALL.to_vec(),
        };
        let mut report = BuildReport::default();
        report
            .steps
            .push(self.step(Step::Kernel, || self.kernel(opts))?);
        report
            .steps
            .push(self.step(Step::Initramfs, || self.initramfs(opts))?);
        for tier in tiers {
            report
                .steps
                .push(self.step(Step::Rootfs(tier), || self.rootfs(tier, opts))?);
        }
        Ok(report)
    }

    fn step(
        &self,
        step: Step,
        f: impl FnOnce() -> Result<(Outcome, String)>,
    ) -> Result<StepReport> {
        let span = tracing::info_span!("image_step", %step);
        let _guard = span.enter();
        self.progress.on_event(&ProgressEvent::Started(step));
        let started = Instant::now();
        let (outcome, summary) = f()?;
        let report = StepReport {
            step,
            outcome,
            elapsed: started.elapsed(),
            summary,
        };
        tracing::info!(?outcome, elapsed_ms = report.elapsed.as_millis(), summary = %report.summary, "step done");
        self.progress
            .on_event(&ProgressEvent::Finished(report.clone()));
        Ok(report)
    }

    fn detail(&self, step: Step, msg: impl Into<String>) {
        self.progress
            .on_event(&ProgressEvent::Detail(step, msg.into()));
    }

    fn current(&self, dir: &std::path::Path, inputs: &Inputs, force: bool) -> Result<bool> {
        if force {
            return Ok(false);
        }
        Ok(Manifest::load(&dir.join(MANIFEST))?.is_some_and(|m| m.is_current(inputs, dir)))
    }

    fn kernel(&self, opts: &BuildOptions) -> Result<(Outcome, String)> {
        let package = kernel_package(&self.apt, self.layout.arch())?;
        let dir = self.layout.kernel_dir();
        if self.current(&dir, &kernel_inputs(&package), opts.force)? {
            return Ok((
                Outcome::Cached,
                format!("{package} ({})", installed_release(&self.layout)?),
            ));
        }
        self.detail(Step::Kernel, format!("downloading {package}"));
        let info = build_kernel(&self.apt, &self.layout, &package)?;
        let summary = match info.compression {
            Some(c) => format!(
                "{} ({}, {:?} payload, PVH entry {}, {} modules)",
                package,
                info.release,
                c,
                info.pvh_entry
                    .map_or("none".to_string(), |e| format!("{e:#x}")),
                info.modules
            ),
            None => format!(
                "{} ({}, {} kernel Image, {} modules)",
                package,
                info.release,
                self.layout.arch(),
                info.modules
            ),
        };
        Ok((Outcome::Built, summary))
    }

    fn initramfs(&self, opts: &BuildOptions) -> Result<(Outcome, String)> {
        if !opts.lohar.is_file() {
            return Err(Error::MissingInput {
                what: "lohar binary",
                path: opts.lohar.clone(),
            });
        }
        let release = installed_release(&self.layout)?;
        let kernel_manifest = Manifest::load(&self.layout.kernel_dir().join(MANIFEST))?
            .ok_or_else(|| Error::MissingInput {
                what: "kernel manifest",
                path: self.layout.kernel_dir().join(MANIFEST),
            })?;
        let (_, lohar_sha) = sha256_file(&opts.lohar)?;
        let inputs = Inputs {
            recipe: INITRAMFS_RECIPE,
            packages: kernel_manifest.inputs.packages.clone(),
            other: BTreeMap::from([
                ("lohar_sha256".to_string(), lohar_sha),
                ("modules".to_string(), GUEST_MODULES.join(",")),
            ]),
        };
        let dir = self.layout.initramfs_dir();
        if self.current(&dir, &inputs, opts.force)? {
            return Ok((Outcome::Cached, format!("lohar {}", opts.lohar.display())));
        }
        let started = Instant::now();
        std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let report = write_initramfs(
            &InitramfsSpec {
                init: opts.lohar.clone(),
                modules_dir: self.layout.modules_dir(&release),
                release,
                modules: GUEST_MODULES.iter().map(|s| s.to_string()).collect(),
                extra_files: vec![],
            },
            &self.layout.initramfs(),
        )?;
        let manifest = Manifest::new(
            "initramfs",
            inputs,
            &dir,
            &["initramfs.cpio"],
            started.elapsed().as_millis() as u64,
        )?;
        manifest.save(&dir.join(MANIFEST))?;
        Ok((
            Outcome::Built,
            format!(
                "{} KiB, {} modules, built in: {}",
                report.size / 1024,
                report.load_order.len(),
                report.builtin.join(" ")
            ),
        ))
    }

    fn rootfs(&self, tier: Tier, opts: &BuildOptions) -> Result<(Outcome, String)> {
        let step = Step::Rootfs(tier);
        let host_apt = Apt::host();
        let (inputs, sources, busybox, lister) = match tier {
            Tier::Tiny => {
                let bb = self.apt.candidate(BUSYBOX_PACKAGE)?;
                let lister = if self.layout.arch().is_host() {
                    None
                } else {
                    Some(host_apt.candidate(BUSYBOX_PACKAGE)?)
                };
                (tiny_inputs(&bb, lister.as_ref()), vec![], Some(bb), lister)
            }
            Tier::Minimal | Tier::Browser | Tier::Docker if !self.layout.arch().is_host() => {
                return Err(Error::ForeignMinimal {
                    arch: self.layout.arch(),
                })
            }
            Tier::Minimal | Tier::Browser | Tier::Docker => {
                let sources = host_debian_sources(std::path::Path::new("/etc/apt"), MINIMAL_SUITE)?;
                let inputs = match tier {
                    Tier::Browser => browser_inputs(&sources),
                    Tier::Docker => {
                        let kernel = Manifest::load(&self.layout.kernel_dir().join(MANIFEST))?
                            .ok_or_else(|| Error::MissingInput {
                                what: "kernel manifest",
                                path: self.layout.kernel_dir().join(MANIFEST),
                            })?;
                        docker_inputs(&sources, &kernel.inputs)
                    }
                    _ => minimal_inputs(&sources),
                };
                (inputs, sources, None, None)
            }
        };
        let dir = self.layout.tier_dir(tier);
        if self.current(&dir, &inputs, opts.force)? {
            return Ok((
                Outcome::Cached,
                format!("{}", self.layout.rootfs(tier).display()),
            ));
        }
        let started = Instant::now();
        let build_root = self.layout.build_dir();
        std::fs::create_dir_all(&build_root).map_err(io("create directory", &build_root))?;
        let staging = Staging::new(&build_root, tier.name())?;
        let root = staging.path().join("root");
        match (tier, &busybox) {
            (Tier::Tiny, Some(bb)) => {
                std::fs::create_dir(&root).map_err(io("create directory", &root))?;
                self.detail(step, format!("unpacking {bb}"));
                stage_tiny(
                    &self.apt,
                    bb,
                    lister.as_ref().map(|l| (&host_apt, l)),
                    staging.path(),
                    &root,
                )?;
            }
            _ => {
                let mut mirrors: Vec<&str> = sources.iter().map(|s| s.uri.as_str()).collect();
                mirrors.dedup();
                let extra = match tier {
                    Tier::Browser => Extra::Browser {
                        work: staging.path().to_owned(),
                    },
                    Tier::Docker => {
                        let release = installed_release(&self.layout)?;
                        Extra::Docker {
                            modules_dir: self.layout.modules_dir(&release),
                            release,
                        }
                    }
                    _ => Extra::None,
                };
                let adds = match tier {
                    Tier::Browser => " + Chromium, fonts, Playwright (pip)",
                    Tier::Docker => " + Docker Engine, kernel modules",
                    _ => "",
                };
                self.detail(
                    step,
                    format!(
                        "mmdebstrap {MINIMAL_SUITE}{adds} via {}",
                        mirrors.join(", ")
                    ),
                );
                stage_debian(&sources, &root, &extra)?;
            }
        }
        self.detail(
            step,
            format!(
                "staged in {:.1}s; packing ext4",
                started.elapsed().as_secs_f64()
            ),
        );
        let out = staging.path().join("out");
        std::fs::create_dir(&out).map_err(io("create directory", &out))?;
        let size = pack_rootfs(
            &root,
            &out.join("rootfs.ext4"),
            &format!("bhatti-{}", tier.name()),
        )?;
        let manifest = Manifest::new(
            &format!("rootfs-{}", tier.name()),
            inputs,
            &out,
            &["rootfs.ext4"],
            started.elapsed().as_millis() as u64,
        )?;
        manifest.save(&out.join(MANIFEST))?;
        crate::fsutil::replace_dir(&out, &dir)?;
        Ok((Outcome::Built, format!("{} MiB image", size >> 20)))
    }
}
