//! `GET /metrics`: Prometheus text format, for admin keys.

use api_types::{SandboxStatus, Thermal};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

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

/// A process's resident memory, from `/proc/<pid>/status` (`VmRSS`, kB).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
