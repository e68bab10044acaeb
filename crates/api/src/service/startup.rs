//! Starting the service (engine, network, recovery, thermal tasks),
//! `/health`, and shutdown.

use std::sync::{Arc, Mutex};

use bhatti_core::{CoreConfig, CoreError, SandboxManager, Stopped, ThermalPolicy};

use super::{persistence, Service};
use crate::config::DaemonConfig;
use crate::error::error_chain;
use crate::secrets::SecretBox;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("invalid configuration: {0}")]
    Config(String),
}

fn engine_preference(s: &str) -> vmm::EnginePreference {
    match s {
        "firecracker" => vmm::EnginePreference::Firecracker,
        "qemu-kvm" => vmm::EnginePreference::QemuKvm,
        "qemu-tcg" => vmm::EnginePreference::QemuTcg,
        _ => vmm::EnginePreference::Auto,
    }
}

/// `[thermal]` as core's policy: the ticker looks four times per shortest
/// timer, at least every second.
fn thermal_policy(c: &crate::config::ThermalConfig) -> ThermalPolicy {
    let warm = std::time::Duration::from_secs(c.warm_after_secs.max(1));
    let cold = std::time::Duration::from_secs(c.cold_after_secs.max(1));
    ThermalPolicy {
        warm_after: warm,
        cold_after: cold,
        tick: (warm.min(cold) / 4).clamp(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(1),
        ),
        ..ThermalPolicy::default()
    }
}

/// An engine handed to [`Service::start`] by its caller (a test's
/// `vmm::fake::FakeEngine`), as core takes it.
#[derive(Debug)]
struct Given(Box<dyn vmm::Engine>);

impl vmm::Engine for Given {
    fn choice(&self) -> &vmm::EngineChoice {
        self.0.choice()
    }

    fn new_vmm(&self, spec: vmm::VmSpec) -> vmm::Result<Box<dyn vmm::Vmm>> {
        self.0.new_vmm(spec)
    }
}

impl Service {
    /// Picks the engine (`config.engine`, or `engine` when given: tests
    /// hand in the fake one), sets up the network and recovers what the
    /// store says existed before this process.
    pub async fn start(
        config: Arc<DaemonConfig>,
        store: Arc<store::Store>,
        secrets: Arc<SecretBox>,
        engine: Option<Box<dyn vmm::Engine>>,
    ) -> Result<Service, StartError> {
        let mut core_config = CoreConfig::new(&config.data_dir);
        core_config.engine = engine_preference(&config.engine);
        core_config.arch = config
            .guest_arch()
            .map_err(|e| StartError::Config(e.to_string()))?;
        core_config.unique_names = false;
        core_config.confinement = config.confinement.to_vmm();
        core_config.thermal = thermal_policy(&config.thermal);
        core_config.group_networks = Some(
            config
                .network
                .group_networks()
                .map_err(StartError::Config)?,
        );
        let core = tokio::task::spawn_blocking(move || {
            let net_ops = Arc::new(net::IpRoute::new("ip"));
            match engine {
                Some(engine) => SandboxManager::with_engine(core_config, Given(engine), net_ops),
                None => SandboxManager::new(core_config, net_ops),
            }
        })
        .await
        .map_err(|e| StartError::Config(format!("setting up the VM layer: {e}")))??;
        let service = Service {
            config,
            store,
            secrets,
            core,
            running: Arc::default(),
            locks: Default::default(),
            creating: Mutex::default(),
            adopted: Mutex::default(),
            warming: Mutex::default(),
            tasks: Mutex::new(Vec::new()),
            names: Arc::default(),
            metrics: Arc::default(),
            image_tasks: Default::default(),
            volume_jobs: Arc::default(),
        };
        let events = service.core.subscribe_thermal();
        let net_tasks = crate::network::start(
            &service.config,
            service.store.clone(),
            service.names.clone(),
            &service.core,
        )
        .await?;
        service.recover().await;
        service.remove_orphan_images().await;
        service.collect_blobs().await;
        let recorder = tokio::spawn(persistence::record_thermal(
            events,
            service.store.clone(),
            service.core.clone(),
            service.running.clone(),
            service.metrics.clone(),
        ));
        let ticker = service.core.spawn_thermal();
        let mut tasks = service.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.extend(net_tasks);
        // The ticker last: shutdown stops it first.
        tasks.extend([recorder, ticker]);
        drop(tasks);
        Ok(service)
    }

    /// `/health`'s answer.
    pub fn health(&self) -> api_types::Health {
        let engine = self.core.engine();
        let (engine_name, accelerator) = match engine.kind {
            vmm::EngineKind::Firecracker => ("firecracker", "kvm"),
            vmm::EngineKind::QemuKvm => ("qemu", "kvm"),
            vmm::EngineKind::QemuTcg => ("qemu", "tcg"),
            vmm::EngineKind::Fake => ("fake", "none"),
        };
        api_types::Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            engine: engine_name.into(),
            accelerator: accelerator.into(),
            engine_reason: engine.reason.clone(),
        }
    }

    /// Daemon shutdown: every VM this process runs goes cold (snapshot,
    /// VMM exits, TAP removed); the next daemon adopts them as cold and
    /// they wake with their processes and memory. One that is not cold
    /// within core's shutdown bound has its VMM killed and is `stopped`
    /// (it boots again from its disk).
    pub async fn shutdown(&self) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        // The ticker (last) stops first; the recorder keeps recording.
        if let Some(ticker) = tasks.last() {
            ticker.abort();
        }
        self.end_utility_vms().await;
        let (stopped, failed) = self.core.stop_all().await;
        for (id, e) in failed {
            tracing::error!(sandbox = %id, error = %error_chain(&e), "shutdown could not stop this sandbox");
        }
        for s in stopped {
            let (record, killed) = match s {
                Stopped::Cold(record) => (record, None),
                Stopped::Killed { record, reason } => (record, Some(reason)),
            };
            let Some(running) = self.index().remove(&record.id) else {
                continue;
            };
            if let Err(e) = self.persist_record(&running, &record).await {
                tracing::error!(sandbox = %record.id, error = %e, "recording a sandbox at shutdown");
            }
            if let Some(reason) = killed {
                let why = format!(
                    "not cold in time at shutdown ({}); boots again from its disk when next used",
                    error_chain(&reason)
                );
                self.set_status(
                    &running.user_id,
                    record.id.as_str(),
                    api_types::SandboxStatus::Stopped,
                    Some(&why),
                )
                .await;
            }
        }
        for t in tasks {
            t.abort();
        }
    }
}
