//! envd's `filesystem.Filesystem` and its `/files` endpoint over the guest
//! agent: `Stat` and `ListDir` are the agent's stat and list; `MakeDir`,
//! `Move` and `Remove` run `mkdir -p`, `mv` and `rm -rf` in the guest;
//! `/files` downloads and uploads through the service's streamed read and
//! atomic write. Paths must be absolute (bhatti does not know the guest
//! user's home to resolve a relative one against).

use std::collections::VecDeque;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use envd_proto::filesystem::{
    EntryInfo, FileType, ListDirRequest, ListDirResponse, MakeDirRequest, MakeDirResponse,
    MoveRequest, MoveResponse, RemoveRequest, RemoveResponse, StatRequest, StatResponse,
};
use proto::{FileKind, FileStat};
use serde::Deserialize;

use super::connect::{self, Call, Code, RpcError};
use super::EnvdCaller;
use crate::error::ApiError;
use crate::ratelimit::Class;
use crate::state::AppState;

/// Entries one `ListDir` answers at most (a deep listing stops there).
pub const MAX_LIST_ENTRIES: usize = 10_000;

pub async fn dispatch(state: &AppState, method: &str, call: Call) -> Response {
    let out = match method {
        "Stat" => stat(state, &call).await,
        "ListDir" => list_dir(state, &call).await,
        "MakeDir" => make_dir(state, &call).await,
        "Move" => rename(state, &call).await,
        "Remove" => remove(state, &call).await,
        "WatchDir" | "CreateWatcher" | "GetWatcherEvents" | "RemoveWatcher" => Err(Failure::Rpc(
            RpcError::unsupported("watching directories (files.watch_dir)"),
        )),
        other => Err(Failure::Rpc(RpcError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{other} does not exist"),
        ))),
    };
    match out {
        Ok(resp) => resp,
        Err(Failure::Rpc(e)) if call.stream => connect::stream_error(call.codec, e),
        Err(Failure::Rpc(e)) => e.response(),
    }
}

enum Failure {
    Rpc(RpcError),
}

impl From<RpcError> for Failure {
    fn from(e: RpcError) -> Failure {
        Failure::Rpc(e)
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Failure {
        Failure::Rpc(e.into())
    }
}

fn msg<M: prost::Message + Default + serde::de::DeserializeOwned>(
    call: &Call,
) -> Result<M, Failure> {
    connect::message(call).map_err(Failure::Rpc)
}

fn path_ok(p: &str) -> Result<(), RpcError> {
    crate::validate::guest_path(p).map_err(|e| {
        RpcError::new(
            Code::InvalidArgument,
            format!("{e} (bhatti's E2B layer needs absolute paths)"),
        )
    })
}

fn entry(path: &str, s: &FileStat) -> EntryInfo {
    let name = s.name.clone();
    let kind = match s.kind {
        FileKind::File => FileType::File,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Other => FileType::Unspecified,
    };
    EntryInfo {
        name,
        r#type: kind as i32,
        path: path.to_string(),
        size: i64::try_from(s.size).unwrap_or(i64::MAX),
        mode: s.mode & 0o7777,
        permissions: permissions(s.kind, s.mode),
        owner: s.uid.to_string(),
        group: s.gid.to_string(),
        modified_time: Some(envd_proto::Timestamp {
            seconds: s.mtime_unix_ms.div_euclid(1000),
            nanos: (s.mtime_unix_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
        symlink_target: s.symlink_target.clone(),
        metadata: Default::default(),
        is_symlink: s.kind == FileKind::Symlink,
    }
}

/// `ls -l` style permissions: `drwxr-xr-x`.
fn permissions(kind: FileKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        _ => '-',
    });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn base_name(path: &str) -> String {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("/")
        .to_string()
}

async fn stat_entry(state: &AppState, call: &Call, path: &str) -> Result<EntryInfo, Failure> {
    let s = state
        .service
        .stat(&call.caller.user, &call.caller.sandbox, path)
        .await?;
    let mut e = entry(path, &s);
    e.name = base_name(path);
    Ok(e)
}

async fn stat(state: &AppState, call: &Call) -> Result<Response, Failure> {
    let req: StatRequest = msg(call)?;
    state.limit(&call.caller.user, Class::Read)?;
    path_ok(&req.path)?;
    let entry = stat_entry(state, call, &req.path).await?;
    Ok(connect::unary(
        call.codec,
        &StatResponse { entry: Some(entry) },
    ))
}

async fn list_dir(state: &AppState, call: &Call) -> Result<Response, Failure> {
    let req: ListDirRequest = msg(call)?;
    state.limit(&call.caller.user, Class::Read)?;
    path_ok(&req.path)?;
    let depth = req.depth.max(1);
    let mut entries = Vec::new();
    let mut todo = VecDeque::from([(req.path.trim_end_matches('/').to_string(), 1u32)]);
    if todo[0].0.is_empty() {
        todo[0].0 = "/".into();
    }
    while let Some((dir, level)) = todo.pop_front() {
        let listing = state
            .service
            .ls(&call.caller.user, &call.caller.sandbox, &dir)
            .await?;
        for s in listing.entries {
            let path = if dir == "/" {
                format!("/{}", s.name)
            } else {
                format!("{dir}/{}", s.name)
            };
            if s.kind == FileKind::Dir && level < depth {
                todo.push_back((path.clone(), level + 1));
            }
            entries.push(entry(&path, &s));
            if entries.len() >= MAX_LIST_ENTRIES {
                todo.clear();
                break;
            }
        }
    }
    Ok(connect::unary(call.codec, &ListDirResponse { entries }))
}

/// Runs a command in the guest for a filesystem call: its stderr is the
/// error of a non-zero exit.
async fn run(state: &AppState, call: &Call, argv: &[&str]) -> Result<(), Failure> {
    let req = proto::ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout_ms: Some(60_000),
        ..Default::default()
    };
    let out = state
        .service
        .exec(&call.caller.user, &call.caller.sandbox, req)
        .await?;
    if out.exit.code == 0 {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let code = if err.contains("No such file") {
        Code::NotFound
    } else if err.contains("ermission denied") {
        Code::PermissionDenied
    } else {
        Code::InvalidArgument
    };
    Err(RpcError::new(code, format!("{}: {err}", argv[0])).into())
}

fn is_not_found(f: &Failure) -> bool {
    matches!(f, Failure::Rpc(e) if e.code == Code::NotFound)
}

async fn make_dir(state: &AppState, call: &Call) -> Result<Response, Failure> {
    let req: MakeDirRequest = msg(call)?;
    state.limit(&call.caller.user, Class::Exec)?;
    path_ok(&req.path)?;
    match stat_entry(state, call, &req.path).await {
        Ok(_) => {
            return Err(
                RpcError::new(Code::AlreadyExists, format!("{} already exists", req.path)).into(),
            )
        }
        Err(f) if is_not_found(&f) => {}
        Err(f) => return Err(f),
    }
    run(state, call, &["mkdir", "-p", "--", &req.path]).await?;
    let entry = stat_entry(state, call, &req.path).await?;
    Ok(connect::unary(
        call.codec,
        &MakeDirResponse { entry: Some(entry) },
    ))
}

async fn rename(state: &AppState, call: &Call) -> Result<Response, Failure> {
    let req: MoveRequest = msg(call)?;
    state.limit(&call.caller.user, Class::Exec)?;
    path_ok(&req.source)?;
    path_ok(&req.destination)?;
    stat_entry(state, call, &req.source).await?;
    run(
        state,
        call,
        &["mv", "-f", "--", &req.source, &req.destination],
    )
    .await?;
    let entry = stat_entry(state, call, &req.destination).await?;
    Ok(connect::unary(
        call.codec,
        &MoveResponse { entry: Some(entry) },
    ))
}

async fn remove(state: &AppState, call: &Call) -> Result<Response, Failure> {
    let req: RemoveRequest = msg(call)?;
    state.limit(&call.caller.user, Class::Exec)?;
    path_ok(&req.path)?;
    if req.path.trim_end_matches('/').is_empty() {
        return Err(RpcError::new(Code::InvalidArgument, "refusing to remove /").into());
    }
    stat_entry(state, call, &req.path).await?;
    run(state, call, &["rm", "-rf", "--", &req.path]).await?;
    Ok(connect::unary(call.codec, &RemoveResponse {}))
}

/// envd's `/files` errors: `{code, message}` with the HTTP status.
fn files_error(e: ApiError) -> Response {
    let status = e.status();
    let body = serde_json::json!({ "code": status.as_u16(), "message": e.to_string() });
    (status, axum::Json(body)).into_response()
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FilesQuery {
    /// The file (absolute).
    #[serde(default)]
    pub path: Option<String>,
    /// The guest user to act as (accepted; bhatti acts as its command user).
    #[serde(default)]
    pub username: Option<String>,
}

/// envd's file download: the file's bytes.
#[utoipa::path(
    get,
    path = "/e2b/envd/files",
    operation_id = "e2b_envd_download",
    tag = "e2b",
    params(FilesQuery,
        ("E2b-Sandbox-Id" = String, Header, description = "The sandbox."),
        ("X-Access-Token" = String, Header, description = "The `envdAccessToken` of the sandbox (a bhatti API key)."),
    ),
    responses(
        (status = 200, description = "The file.", content_type = "application/octet-stream", body = inline(crate::openapi::Binary)),
        (status = 400, description = "Bad path: `{code, message}`."),
        (status = 401, description = "No or a wrong key: `{code, message}`."),
        (status = 404, description = "No such sandbox of the caller's or no such file: `{code, message}`."),
    )
)]
pub async fn download(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    match download_inner(&state, &headers, query).await {
        Ok(r) => r,
        Err(e) => files_error(e),
    }
}

async fn envd_caller(state: &AppState, headers: &HeaderMap) -> Result<EnvdCaller, ApiError> {
    let (mut parts, ()) = axum::http::Request::new(()).into_parts();
    parts.headers = headers.clone();
    <EnvdCaller as axum::extract::FromRequestParts<AppState>>::from_request_parts(&mut parts, state)
        .await
}

async fn download_inner(
    state: &AppState,
    headers: &HeaderMap,
    query: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let caller = envd_caller(state, headers).await?;
    state.limit(&caller.user, Class::Read)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let path = q
        .path
        .ok_or_else(|| ApiError::BadRequest("the path parameter is required".into()))?;
    crate::validate::guest_path(&path)?;
    let file = state
        .service
        .read_file(
            &caller.user,
            &caller.sandbox,
            proto::FileRead {
                path,
                offset: None,
                limit: None,
                max_bytes: None,
            },
        )
        .await?;
    let total = file.total_size();
    let body = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        match file.next_chunk().await {
            Ok(Some(c)) => Some((Ok(Bytes::from(c)), Some(file))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    let mut resp = Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    Ok(resp)
}

/// envd's file upload: `multipart/form-data` (a `file` part per file, its
/// filename the path unless `path` names the one file) or
/// `application/octet-stream` (the body is the file at `path`). Parent
/// directories are created.
#[utoipa::path(
    post,
    path = "/e2b/envd/files",
    operation_id = "e2b_envd_upload",
    tag = "e2b",
    params(FilesQuery,
        ("E2b-Sandbox-Id" = String, Header, description = "The sandbox."),
        ("X-Access-Token" = String, Header, description = "The `envdAccessToken` of the sandbox (a bhatti API key)."),
    ),
    request_body(content = inline(crate::openapi::Binary), content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "What was written: `[{name, type, path}]`."),
        (status = 400, description = "Bad path or body: `{code, message}`."),
        (status = 401, description = "No or a wrong key: `{code, message}`."),
        (status = 404, description = "No such sandbox of the caller's: `{code, message}`."),
        (status = 413, description = "Over 100 MB: `{code, message}`."),
    )
)]
pub async fn upload(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Response {
    match upload_inner(&state, &headers, query, body).await {
        Ok(r) => r,
        Err(e) => files_error(e),
    }
}

async fn upload_inner(
    state: &AppState,
    headers: &HeaderMap,
    query: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = envd_caller(state, headers).await?;
    state.limit(&caller.user, Class::Exec)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        return Err(ApiError::BadRequest(
            "compressed uploads (gzip=True) are not supported by bhatti's E2B layer".into(),
        ));
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let limit = api_types::limits::MAX_FILE_BODY as usize;
    let mut files: Vec<(String, Bytes)> = Vec::new();
    if ct.starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(&ct)
            .map_err(|e| ApiError::BadRequest(format!("multipart body: {e}")))?;
        let mut form = multer::Multipart::new(body.into_data_stream(), boundary);
        let mut total = 0usize;
        while let Some(field) = form.next_field().await.map_err(|e| multipart_error(&e))? {
            if field.name() != Some("file") {
                continue;
            }
            let name = field.file_name().map(str::to_string);
            let data = field.bytes().await.map_err(|e| multipart_error(&e))?;
            total += data.len();
            if total > limit {
                return Err(ApiError::PayloadTooLarge("upload over 100 MB".into()));
            }
            let path = match name {
                Some(n) if n.starts_with('/') => n,
                _ => q.path.clone().ok_or_else(|| {
                    ApiError::BadRequest(
                        "a file part needs an absolute filename or the path parameter".into(),
                    )
                })?,
            };
            files.push((path, data));
        }
        if files.len() == 1 {
            if let Some(p) = &q.path {
                files[0].0 = p.clone();
            }
        }
    } else {
        let path = q
            .path
            .clone()
            .ok_or_else(|| ApiError::BadRequest("the path parameter is required".into()))?;
        let data = axum::body::to_bytes(body, limit)
            .await
            .map_err(|_| ApiError::PayloadTooLarge("upload over 100 MB".into()))?;
        files.push((path, data));
    }
    if files.is_empty() {
        return Err(ApiError::BadRequest("no file in the upload".into()));
    }
    let mut written = Vec::new();
    for (path, data) in files {
        crate::validate::guest_path(&path)?;
        let opts = agent_client::WriteOptions {
            create_dirs: true,
            ..Default::default()
        };
        state
            .service
            .write_file(
                &caller.user,
                &caller.sandbox,
                &path,
                data.len() as u64,
                std::io::Cursor::new(data),
                opts,
            )
            .await?;
        written.push(serde_json::json!({
            "name": base_name(&path),
            "type": "file",
            "path": path,
        }));
    }
    Ok((StatusCode::OK, axum::Json(written)).into_response())
}

fn multipart_error(e: &multer::Error) -> ApiError {
    match e {
        multer::Error::StreamReadFailed(_) => {
            ApiError::PayloadTooLarge("upload over 100 MB".into())
        }
        other => ApiError::BadRequest(format!("multipart body: {other}")),
    }
}

/// envd's health probe.
#[utoipa::path(
    get,
    path = "/e2b/envd/health",
    operation_id = "e2b_envd_health",
    tag = "e2b",
    security(()),
    responses((status = 200, description = "The daemon answers (the SDK probes it after a failed call; no key)."))
)]
pub async fn health() -> StatusCode {
    StatusCode::OK
}
