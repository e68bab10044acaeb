//! The E2B sandbox API (`E2B_API_URL=<daemon>/e2b`) over the sandbox
//! service. A sandbox's E2B id is its bhatti id; its template is its
//! image (`base`, the SDK's default, is the daemon's default image); its
//! metadata are its labels. `pause` takes it warm (vCPUs stopped; memory,
//! processes and connections kept), `connect` wakes it (or boots a
//! stopped one). A timeout, when it passes, takes the sandbox cold (a
//! snapshot on disk; nothing is lost) rather than destroying it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{lock, BySandbox, ENVD_VERSION};
use crate::error::ApiError;
use crate::ratelimit::Class;
use crate::state::AppState;

/// The longest timeout E2B allows (24 h); longer ones are cut to it.
const MAX_TIMEOUT_SECS: u64 = 86_400;
/// E2B's default sandbox timeout.
const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// An E2B API error: `{code, message}` with the status `code`.
#[derive(Debug)]
pub struct E2bError(pub ApiError);

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> Self {
        E2bError(e)
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        if let ApiError::Internal(m) = &self.0 {
            tracing::error!(error = %m, "internal error");
        }
        let body = ErrorBody {
            code: status.as_u16(),
            message: self.0.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

/// E2B's error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
}

/// A sandbox's deadline (when its timeout passes), by id.
#[derive(Debug, Default)]
pub struct Timeouts {
    deadlines: BySandbox<Deadline>,
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Deadline {
    at: SystemTime,
    generation: u64,
    task: tokio::task::AbortHandle,
}

/// A created or connected sandbox (E2B's `Sandbox`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct E2bSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub envd_version: String,
    /// The token envd calls carry in `X-Access-Token`: the caller's key.
    pub envd_access_token: String,
    pub alias: Option<String>,
}

/// A sandbox as `GET /sandboxes/{id}` and the lists show it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct E2bSandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub alias: Option<String>,
    pub started_at: String,
    pub end_at: String,
    pub envd_version: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// `running` (hot) or `paused` (warm, cold or stopped).
    pub state: String,
    pub metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
}

/// The create body (E2B's `NewSandbox`); options bhatti cannot honour
/// are refused by name.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    #[serde(default)]
    pub auto_pause: Option<bool>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub auto_resume: Option<serde_json::Value>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub auto_pause_memory: Option<serde_json::Value>,
    #[serde(default)]
    pub secure: Option<bool>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub other: HashMap<String, serde_json::Value>,
}

/// `POST …/timeout` and `…/connect` bodies.
#[derive(Debug, Deserialize, Default, utoipa::ToSchema)]
pub struct TimeoutBody {
    #[serde(default)]
    pub timeout: Option<u64>,
}

fn rfc3339(unix_secs: i64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// The key the caller authenticated with (the sandbox's envd token).
fn key_of(headers: &HeaderMap) -> String {
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Timeouts {
    fn end_at(&self, id: &str, created_at: i64) -> String {
        match lock(&self.deadlines).get(id) {
            Some(d) => {
                let secs = d.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                rfc3339(secs as i64)
            }
            None => rfc3339(created_at.div_euclid(1000) + DEFAULT_TIMEOUT_SECS as i64),
        }
    }

    fn forget(&self, id: &str) {
        if let Some(d) = lock(&self.deadlines).remove(id) {
            d.task.abort();
        }
    }
}

/// Sets a sandbox's timeout: when it passes (and was not set again
/// meanwhile), the sandbox is taken cold. One task per sandbox: setting
/// it again ends the one before.
fn arm(state: &AppState, user: &std::sync::Arc<store::UserRecord>, id: &str, secs: u64) {
    let secs = secs.clamp(1, MAX_TIMEOUT_SECS);
    let at = SystemTime::now() + Duration::from_secs(secs);
    let timeouts = &state.e2b.timeouts;
    let generation = timeouts
        .generation
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (st, user, sid) = (state.clone(), user.clone(), id.to_string());
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let current = {
            let mut deadlines = lock(&st.e2b.timeouts.deadlines);
            let current = deadlines
                .get(&sid)
                .is_some_and(|d| d.generation == generation);
            if current {
                deadlines.remove(&sid);
            }
            current
        };
        if !current {
            return;
        }
        match st.service.stop(&user, &sid).await {
            Ok(_) => tracing::info!(sandbox = %sid, "E2B timeout passed: taken cold"),
            Err(e) => tracing::debug!(sandbox = %sid, error = %e, "E2B timeout passed"),
        }
    });
    let old = lock(&timeouts.deadlines).insert(
        id.to_string(),
        Deadline {
            at,
            generation,
            task: task.abort_handle(),
        },
    );
    if let Some(old) = old {
        old.task.abort();
    }
}

fn detail(state: &AppState, s: &api_types::Sandbox, token: Option<String>) -> E2bSandboxDetail {
    let paused =
        s.status != api_types::SandboxStatus::Running || s.thermal != api_types::Thermal::Hot;
    E2bSandboxDetail {
        template_id: s.image.clone(),
        sandbox_id: s.id.clone(),
        client_id: "bhatti".into(),
        alias: Some(s.name.clone()),
        started_at: rfc3339(s.created_at.div_euclid(1000)),
        end_at: state.e2b.timeouts.end_at(&s.id, s.created_at),
        envd_version: ENVD_VERSION.into(),
        cpu_count: s.cpus,
        memory_mb: s.memory_mb,
        disk_size_mb: s.disk_size_mb,
        state: if paused { "paused" } else { "running" }.into(),
        metadata: s.labels.clone(),
        envd_access_token: token,
    }
}

fn created(s: &api_types::Sandbox, key: String) -> E2bSandbox {
    E2bSandbox {
        template_id: s.image.clone(),
        sandbox_id: s.id.clone(),
        client_id: "bhatti".into(),
        envd_version: ENVD_VERSION.into(),
        envd_access_token: key,
        alias: Some(s.name.clone()),
    }
}

/// Creates a sandbox from a template (a bhatti image).
#[utoipa::path(
    post,
    path = "/e2b/v2/sandboxes",
    operation_id = "e2b_create_sandbox",
    tag = "e2b",
    request_body = NewSandbox,
    responses(
        (status = 201, description = "Created and running.", body = E2bSandbox),
        (status = 400, description = "Unknown template or an option bhatti does not support.", body = ErrorBody),
        (status = 401, description = "No or a wrong `X-API-Key`.", body = ErrorBody),
        (status = 403, description = "Past a quota.", body = ErrorBody),
        (status = 429, description = "Rate limited.", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<E2bSandbox>), E2bError> {
    let user = super::caller(&state, &headers).await?;
    state.limit(&user, Class::Create)?;
    let body: NewSandbox = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid sandbox body: {e}")))?;
    let mut unsupported: Vec<&str> = body
        .other
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, _)| k.as_str())
        .filter(|k| ["mcp", "network", "volumeMounts", "iam", "lifecycle"].contains(k))
        .collect();
    if body.secure == Some(false) {
        unsupported.push("secure=false");
    }
    if !unsupported.is_empty() {
        unsupported.sort_unstable();
        return Err(ApiError::BadRequest(format!(
            "not supported by bhatti's E2B compatibility: {}",
            unsupported.join(", ")
        ))
        .into());
    }
    let image = match body.template_id.as_str() {
        "" => return Err(ApiError::BadRequest("templateID is required".into()).into()),
        "base" => None,
        t => Some(t.to_string()),
    };
    let create = api_types::CreateSandbox {
        image,
        env: body.env_vars.unwrap_or_default(),
        labels: body.metadata.unwrap_or_default(),
        egress: (body.allow_internet_access == Some(false)).then_some(api_types::Egress::None),
        ..Default::default()
    };
    let template = body.template_id.clone();
    let (_, sandbox) = state
        .service
        .create(&user, create)
        .await
        .map_err(|e| match e {
            ApiError::BadRequest(m) if m.contains("image") => {
                ApiError::BadRequest(format!("template '{template}' not found: {m}"))
            }
            other => other,
        })?;
    arm(
        &state,
        &user,
        &sandbox.id,
        body.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS),
    );
    Ok((
        StatusCode::CREATED,
        Json(created(&sandbox, key_of(&headers))),
    ))
}

/// The v1 create (same as v2).
#[utoipa::path(
    post,
    path = "/e2b/sandboxes",
    operation_id = "e2b_create_sandbox_v1",
    tag = "e2b",
    request_body = NewSandbox,
    responses(
        (status = 201, description = "Created and running.", body = E2bSandbox),
        (status = 400, description = "Unknown template or an option bhatti does not support.", body = ErrorBody),
        (status = 401, description = "No or a wrong `X-API-Key`.", body = ErrorBody),
    )
)]
pub async fn create_v1(
    state: State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<E2bSandbox>), E2bError> {
    create(state, headers, body).await
}

async fn list_inner(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Json<Vec<E2bSandboxDetail>>, E2bError> {
    let user = super::caller(state, headers).await?;
    state.limit(&user, Class::Read)?;
    let mut want_meta: Vec<(String, String)> = Vec::new();
    let mut want_state: Option<Vec<String>> = None;
    let mut want_template: Option<String> = None;
    for (k, v) in form_pairs(query.unwrap_or("")) {
        match k.as_str() {
            "metadata" => want_meta.extend(form_pairs(&v)),
            "state" => want_state = Some(v.split(',').map(str::to_string).collect()),
            "template" => want_template = Some(v),
            "startedAfter" => {
                return Err(ApiError::BadRequest(
                    "the startedAfter filter is not supported by bhatti's E2B compatibility".into(),
                )
                .into())
            }
            // Paging (one page answers all) and order.
            _ => {}
        }
    }
    let all = state.service.list(&user).await?;
    let out = all
        .iter()
        .map(|s| detail(state, s, None))
        .filter(|d| want_meta.iter().all(|(k, v)| d.metadata.get(k) == Some(v)))
        .filter(|d| want_state.as_ref().is_none_or(|w| w.contains(&d.state)))
        .filter(|d| want_template.as_ref().is_none_or(|t| *t == d.template_id))
        .collect();
    Ok(Json(out))
}

/// `application/x-www-form-urlencoded` pairs, decoded.
fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The caller's sandboxes (`metadata` and `state` filters).
#[utoipa::path(
    get,
    path = "/e2b/v2/sandboxes",
    operation_id = "e2b_list_sandboxes",
    tag = "e2b",
    params(
        ("metadata" = Option<String>, Query, description = "URL-encoded `key=value` pairs every listed sandbox has."),
        ("state" = Option<String>, Query, description = "`running`, `paused` or both, comma-separated."),
    ),
    responses(
        (status = 200, description = "The sandboxes (one page: no `nextToken`).", body = Vec<E2bSandboxDetail>),
        (status = 401, description = "No or a wrong `X-API-Key`.", body = ErrorBody),
    )
)]
pub async fn list_v2(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Json<Vec<E2bSandboxDetail>>, E2bError> {
    list_inner(&state, &headers, uri.query()).await
}

/// The v1 list (same as v2).
#[utoipa::path(
    get,
    path = "/e2b/sandboxes",
    operation_id = "e2b_list_sandboxes_v1",
    tag = "e2b",
    responses(
        (status = 200, description = "The sandboxes.", body = Vec<E2bSandboxDetail>),
        (status = 401, description = "No or a wrong `X-API-Key`.", body = ErrorBody),
    )
)]
pub async fn list_v1(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Json<Vec<E2bSandboxDetail>>, E2bError> {
    list_inner(&state, &headers, uri.query()).await
}

/// One sandbox (never wakes it).
#[utoipa::path(
    get,
    path = "/e2b/sandboxes/{id}",
    operation_id = "e2b_get_sandbox",
    tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id.")),
    responses(
        (status = 200, description = "The sandbox.", body = E2bSandboxDetail),
        (status = 404, description = "No such sandbox of the caller's.", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<E2bSandboxDetail>, E2bError> {
    let user = super::caller(&state, &headers).await?;
    state.limit(&user, Class::Read)?;
    let s = state.service.get(&user, &id).await?;
    Ok(Json(detail(&state, &s, Some(key_of(&headers)))))
}

/// Kills (destroys) a sandbox.
#[utoipa::path(
    delete,
    path = "/e2b/sandboxes/{id}",
    operation_id = "e2b_kill_sandbox",
    tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id.")),
    responses(
        (status = 204, description = "Destroyed."),
        (status = 404, description = "No such sandbox of the caller's.", body = ErrorBody),
    )
)]
pub async fn kill(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let user = super::caller(&state, &headers).await?;
    state.limit(&user, Class::Create)?;
    state.service.destroy(&user, &id).await?;
    state.e2b.timeouts.forget(&id);
    Ok(StatusCode::NO_CONTENT)
}

/// Sets the sandbox's timeout from now.
#[utoipa::path(
    post,
    path = "/e2b/sandboxes/{id}/timeout",
    operation_id = "e2b_set_timeout",
    tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id.")),
    request_body = TimeoutBody,
    responses(
        (status = 204, description = "Set: when it passes, the sandbox is taken cold."),
        (status = 404, description = "No such sandbox of the caller's.", body = ErrorBody),
    )
)]
pub async fn set_timeout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    let user = super::caller(&state, &headers).await?;
    state.limit(&user, Class::Read)?;
    let b: TimeoutBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid timeout body: {e}")))?;
    let secs = b
        .timeout
        .ok_or_else(|| ApiError::BadRequest("timeout (seconds) is required".into()))?;
    let s = state.service.get(&user, &id).await?;
    arm(&state, &user, &s.id, secs);
    Ok(StatusCode::NO_CONTENT)
}

/// Keeps a sandbox alive: its timeout starts again (`refreshes`).
#[utoipa::path(
    post,
    path = "/e2b/sandboxes/{id}/refreshes",
    operation_id = "e2b_refresh",
    tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id.")),
    responses(
        (status = 204, description = "Refreshed."),
        (status = 404, description = "No such sandbox of the caller's.", body = ErrorBody),
    )
)]
pub async fn refresh(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    let user = super::caller(&state, &headers).await?;
    state.limit(&user, Class::Read)?;
    let b: TimeoutBody = serde_json::from_slice(&body).unwrap_or_default();
    let s = state.service.get(&user, &id).await?;
    arm(
        &state,
        &user,
        &s.id,
        b.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// Pauses a sandbox: hot → warm (vCPUs stopped; memory, processes and
/// connections kept).
#[utoipa::path(
    post,
    path = "/e2b/sandboxes/{id}/pause",
    operation_id = "e2b_pause",
    tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id.")),
    responses(
        (status = 204, description = "Paused."),
        (status = 404, description = "No such sandbox of the caller's.", body = ErrorBody),
        (status = 409, description = "Not running (stopped or failed).", body = ErrorBody),
    )
)]
pub async fn pause(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let user = super::caller(&state, &headers).await?;
    state.limit(&user, Class::Create)?;
    state.service.pause(&user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn connect_inner(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    body: &[u8],
) -> Result<(StatusCode, Json<E2bSandbox>), E2bError> {
    let user = super::caller(state, headers).await?;
    state.limit(&user, Class::Create)?;
    let b: TimeoutBody = if body.is_empty() {
        TimeoutBody::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("invalid connect body: {e}")))?
    };
    let s = state.service.start_sandbox(&user, id, false).await?;
    if let Some(t) = b.timeout {
        arm(state, &user, &s.id, t);
    }
    Ok((StatusCode::OK, Json(created(&s, key_of(headers)))))
}

/// Connects to a sandbox: wakes a paused (warm or cold) one, boots a
/// stopped one.
#[utoipa::path(
    post,
    path = "/e2b/v2/sandboxes/{id}/connect",
    operation_id = "e2b_connect",
    tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id.")),
    request_body = TimeoutBody,
    responses(
        (status = 200, description = "Running.", body = E2bSandbox),
        (status = 404, description = "No such sandbox of the caller's.", body = ErrorBody),
    )
)]
pub async fn connect_v2(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<E2bSandbox>), E2bError> {
    connect_inner(&state, &headers, &id, &body).await
}

/// The v1 connect (same as v2).
#[utoipa::path(
    post,
    path = "/e2b/sandboxes/{id}/connect",
    operation_id = "e2b_connect_v1",
    tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id.")),
    request_body = TimeoutBody,
    responses(
        (status = 200, description = "Running.", body = E2bSandbox),
        (status = 404, description = "No such sandbox of the caller's.", body = ErrorBody),
    )
)]
pub async fn connect_v1(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<E2bSandbox>), E2bError> {
    connect_inner(&state, &headers, &id, &body).await
}

/// The v1 resume (same as connect).
#[utoipa::path(
    post,
    path = "/e2b/sandboxes/{id}/resume",
    operation_id = "e2b_resume",
    tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id.")),
    request_body = TimeoutBody,
    responses(
        (status = 201, description = "Running.", body = E2bSandbox),
        (status = 404, description = "No such sandbox of the caller's.", body = ErrorBody),
    )
)]
pub async fn resume(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<E2bSandbox>), E2bError> {
    let (_, j) = connect_inner(&state, &headers, &id, &body).await?;
    Ok((StatusCode::CREATED, j))
}

/// Every other E2B API path (templates, snapshots, volumes, metrics,
/// logs, forks, network updates…): an E2B error saying bhatti does not
/// serve it.
#[utoipa::path(
    method(get, put, post, delete, options, head, patch, trace),
    path = "/e2b/{*rest}",
    operation_id = "e2b_unsupported",
    tag = "e2b",
    params(("rest" = String, Path, description = "Any other path.")),
    responses(
        (status = 401, description = "No or a wrong `X-API-Key`.", body = ErrorBody),
        (status = 501, description = "Not supported by bhatti's E2B compatibility.", body = ErrorBody),
    )
)]
pub async fn unsupported(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(rest): Path<String>,
) -> Response {
    if let Err(e) = super::caller(&state, &headers).await {
        return E2bError(e).into_response();
    }
    let body = ErrorBody {
        code: 501,
        message: format!(
            "/{rest} is not supported by bhatti's E2B compatibility (see docs/clients.md)"
        ),
    };
    (StatusCode::NOT_IMPLEMENTED, Json(body)).into_response()
}
