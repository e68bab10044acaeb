//! `GET /metrics` (Prometheus text format) and `GET /admin/status`, for
//! admin keys.

use api_types::{SandboxStatus, Thermal};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use crate::auth::User;
use crate::error::ApiError;
use crate::observe::Gauge;
use crate::openapi::{AdminOnly, Authed};
use crate::state::{blocking, AppState};

/// The daemon's metrics in the Prometheus text format (0.0.4); the series
/// are listed in docs/operations.md. Admin keys only.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "observability",
    responses(
        (status = 200, description = "The metrics, `text/plain; version=0.0.4`.", body = String, content_type = "text/plain"),
        Authed, AdminOnly
    )
)]
pub async fn metrics(
    State(state): State<AppState>,
    User(user): User,
) -> Result<impl IntoResponse, ApiError> {
    state.require_admin(&user)?;
    let store = state.store.clone();
    let (rows, users) =
        blocking(move || Ok((store.all_sandboxes()?, store.users()?.len()))).await?;
    let mut gauges = Vec::new();
    for status in [
        SandboxStatus::Creating,
        SandboxStatus::Running,
        SandboxStatus::Stopped,
        SandboxStatus::Failed,
    ] {
        for thermal in [Thermal::Hot, Thermal::Warm, Thermal::Cold] {
            let n = rows
                .iter()
                .filter(|r| r.status == status && r.thermal == thermal)
                .count();
            gauges.push(Gauge {
                name: "bhatti_sandboxes",
                help: "Sandboxes by status and thermal tier.",
                labels: vec![
                    ("status", status.as_str().to_string()),
                    ("thermal", thermal.as_str().to_string()),
                ],
                value: n as f64,
            });
        }
    }
    gauges.push(Gauge {
        name: "bhatti_users",
        help: "Users.",
        labels: vec![],
        value: users as f64,
    });
    let pids = state.service.vmm_pids();
    let rss = tokio::task::spawn_blocking(move || {
        pids.iter()
            .filter_map(|p| rss_bytes(*p))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("reading VMM memory: {e}")))?;
    gauges.push(Gauge {
        name: "bhatti_vmm_processes",
        help: "VMM processes this daemon runs.",
        labels: vec![],
        value: rss.len() as f64,
    });
    gauges.push(Gauge {
        name: "bhatti_vmm_resident_memory_bytes",
        help: "Resident memory (RSS) of all VMM processes together.",
        labels: vec![],
        value: rss.iter().sum::<u64>() as f64,
    });
    gauges.push(Gauge {
        name: "bhatti_build_info",
        help: "The daemon's version.",
        labels: vec![("version", env!("CARGO_PKG_VERSION").to_string())],
        value: 1.0,
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.service.metrics().render(&gauges),
    ))
}

/// The resident memory of each VMM this daemon runs.
async fn vmm_rss(state: &AppState) -> Result<Vec<u64>, ApiError> {
    let pids = state.service.vmm_pids();
    tokio::task::spawn_blocking(move || {
        pids.iter()
            .filter_map(|p| rss_bytes(*p))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("reading VMM memory: {e}")))
}

/// The daemon at a glance: engine, users, sandboxes by status and tier,
/// and the host's capacity used and free. Admin keys only.
#[utoipa::path(
    get,
    path = "/admin/status",
    operation_id = "admin_status",
    tag = "observability",
    responses(
        (status = 200, description = "The daemon's status.", body = api_types::AdminStatus),
        Authed, AdminOnly
    )
)]
pub async fn status(
    State(state): State<AppState>,
    User(user): User,
) -> Result<Json<api_types::AdminStatus>, ApiError> {
    state.require_admin(&user)?;
    let store = state.store.clone();
    let (rows, users) =
        blocking(move || Ok((store.all_sandboxes()?, store.users()?.len()))).await?;
    let mut sandboxes = std::collections::BTreeMap::new();
    let mut running_by_tier = std::collections::BTreeMap::new();
    for status in [
        SandboxStatus::Creating,
        SandboxStatus::Running,
        SandboxStatus::Stopped,
        SandboxStatus::Failed,
    ] {
        sandboxes.insert(status.as_str().to_string(), 0);
    }
    for thermal in [Thermal::Hot, Thermal::Warm, Thermal::Cold] {
        running_by_tier.insert(thermal.as_str().to_string(), 0);
    }
    let (mut cpus, mut memory) = (0u64, 0u64);
    for r in &rows {
        *sandboxes.entry(r.status.as_str().to_string()).or_insert(0) += 1;
        if r.status == SandboxStatus::Running {
            *running_by_tier
                .entry(r.thermal.as_str().to_string())
                .or_insert(0) += 1;
            if r.thermal != Thermal::Cold {
                cpus += u64::from(r.cpus);
                memory += r.memory_mb;
            }
        }
    }
    let rss: u64 = vmm_rss(&state).await?.iter().sum();
    let (total, available) = tokio::task::spawn_blocking(host_memory_mb)
        .await
        .map_err(|e| ApiError::Internal(format!("reading host memory: {e}")))?;
    Ok(Json(api_types::AdminStatus {
        health: state.health.clone(),
        users: users as u64,
        sandboxes,
        running_by_tier,
        capacity: api_types::Capacity {
            host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as u64),
            host_memory_mb: total,
            host_memory_available_mb: available,
            cpus_allocated: cpus,
            memory_mb_allocated: memory,
            vmm_resident_mb: rss / (1024 * 1024),
        },
    }))
}

/// The host's `MemTotal` and `MemAvailable`, MiB (0 when unreadable).
fn host_memory_mb() -> (u64, u64) {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// A process's resident memory, from `/proc/<pid>/status` (`VmRSS`, kB).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
