//! `GET/HEAD/PUT /sandboxes/:id/files?path=…`.

use api_types::headers;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::QueryParams;
use crate::ratelimit::Class;
use crate::state::AppState;
use crate::validate;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    path: String,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    max_bytes: Option<u64>,
    #[serde(default)]
    ls: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    path: String,
    /// Octal permission bits, e.g. `0755`.
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    path: String,
}

fn kind_name(k: proto::FileKind) -> &'static str {
    match k {
        proto::FileKind::File => "file",
        proto::FileKind::Dir => "dir",
        proto::FileKind::Symlink => "symlink",
        proto::FileKind::Other => "other",
    }
}

fn hv(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("?"))
}

pub async fn read(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<ReadQuery>,
) -> Result<Response, ApiError> {
    state.limit(&user, Class::Read)?;
    validate::guest_path(&q.path)?;
    let agent = state.service.agent(&user, &id).await?;
    if q.ls.unwrap_or(false) {
        let l = agent.ls(&q.path).await?;
        let entries = l
            .entries
            .into_iter()
            .map(|e| api_types::FileEntry {
                name: e.name,
                kind: kind_name(e.kind).to_string(),
                size: e.size,
                mode: e.mode,
                mtime_ms: e.mtime_unix_ms,
                symlink_target: e.symlink_target,
            })
            .collect();
        return Ok(Json(api_types::Listing {
            path: q.path,
            entries,
            total: l.total,
            truncated: l.truncated,
        })
        .into_response());
    }
    let content = agent
        .read_file(proto::FileRead {
            path: q.path,
            offset: q.offset,
            limit: q.limit,
            max_bytes: q.max_bytes,
        })
        .await?;
    let mut resp = Body::from(Bytes::from(content.data)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(headers::FILE_SIZE, hv(content.total_size.to_string()));
    h.insert(headers::TRUNCATED, hv(content.truncated.to_string()));
    h.insert(
        headers::FILE_MODE,
        hv(format!("{:o}", content.mode & 0o7777)),
    );
    Ok(resp)
}

pub async fn head(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<PathQuery>,
) -> Result<Response, ApiError> {
    state.limit(&user, Class::Read)?;
    validate::guest_path(&q.path)?;
    let agent = state.service.agent(&user, &id).await?;
    let st = agent.stat(&q.path).await?;
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert(headers::FILE_SIZE, hv(st.size.to_string()));
    h.insert(headers::FILE_KIND, hv(kind_name(st.kind).to_string()));
    h.insert(headers::FILE_MODE, hv(format!("{:o}", st.mode & 0o7777)));
    Ok(resp)
}

pub async fn write(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<WriteQuery>,
    body: Body,
) -> Result<Json<api_types::Written>, ApiError> {
    state.limit(&user, Class::Exec)?;
    validate::guest_path(&q.path)?;
    let mode = match &q.mode {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("mode must be octal permission bits, got '{m}'"))
                })?,
        ),
    };
    let limit = api_types::limits::MAX_FILE_BODY as usize;
    let data = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(format!("a file may be at most {limit} bytes")))?;
    let agent = state.service.agent(&user, &id).await?;
    let opts = agent_client::WriteOptions {
        mode,
        ..Default::default()
    };
    let bytes = agent.write_file(&q.path, &data, opts).await?;
    Ok(Json(api_types::Written {
        path: q.path,
        bytes,
    }))
}
