//! `GET/HEAD/PUT /sandboxes/:id/files?path=…`. Downloads and uploads
//! stream through the daemon chunk by chunk, pulled by the receiving side:
//! a file of any size passes through a bounded amount of memory, and a
//! slow client slows the guest rather than filling the daemon.

use std::pin::Pin;
use std::task::{Context, Poll};

use api_types::headers;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::QueryParams;
use crate::openapi::{Authed, Guest, Invalid, Missing};
use crate::ratelimit::Class;
use crate::state::AppState;
use crate::validate;

/// The query of `GET …/files` (no other parameter is accepted).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    /// Absolute path in the guest.
    path: String,
    /// Bytes to skip from the start.
    #[serde(default)]
    offset: Option<u64>,
    /// Bytes to read at most, from `offset`.
    #[serde(default)]
    limit: Option<u64>,
    /// Bytes to answer at most (the rest left out, `X-Truncated: true`).
    #[serde(default)]
    max_bytes: Option<u64>,
    /// `true`: list the directory (`Listing`) instead of reading a file.
    #[serde(default)]
    ls: Option<bool>,
}

/// The query of `PUT …/files`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    /// Absolute path in the guest.
    path: String,
    /// Octal permission bits, e.g. `0755`.
    #[serde(default)]
    mode: Option<String>,
}

/// The query of `HEAD …/files`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    /// Absolute path in the guest.
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

/// With `offset` or `limit`, whether the result was cut is known only at
/// its end: results up to this size are read first so that `X-Truncated`
/// can say; a larger one streams without the header.
const TRUNCATION_LOOKAHEAD: usize = 1024 * 1024;

/// Reads a file (streamed, any size) or, with `ls=true`, lists a directory.
#[utoipa::path(
    get,
    path = "/sandboxes/{id}/files",
    operation_id = "read_file",
    tag = "guest",
    params(("id" = String, Path, description = "The sandbox's id or name."), ReadQuery),
    responses(
        (status = 200, description = "The file's bytes, or with `ls=true` the directory's listing.",
            headers(
                ("X-File-Size" = u64, description = "Size of the whole file (not with `ls`)."),
                ("X-Truncated" = bool, description = "`true` when `max_bytes`/`limit` left part of the file out; with `offset` or `limit` a result over 1 MiB streams without it."),
                ("X-File-Mode" = String, description = "Permission bits, octal."),
            ),
            content(
                (inline(crate::openapi::Binary) = "application/octet-stream"),
                (api_types::Listing = "application/json"),
            )
        ),
        (status = 403, description = "The guest refused access.", body = api_types::ErrorBody),
        Authed, Invalid, Missing, Guest
    )
)]
pub async fn read(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<ReadQuery>,
) -> Result<Response, ApiError> {
    state.limit(&user, Class::Read)?;
    validate::guest_path(&q.path)?;
    if q.ls.unwrap_or(false) {
        let l = state.service.ls(&user, &id, &q.path).await?;
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
    let by_lines = q.offset.is_some() || q.limit.is_some();
    let mut file = state
        .service
        .read_file(
            &user,
            &id,
            proto::FileRead {
                path: q.path,
                offset: q.offset,
                limit: q.limit,
                max_bytes: q.max_bytes,
            },
        )
        .await?;
    let (total, mode) = (file.total_size(), file.mode());
    let mut ahead = Vec::new();
    let truncated = if by_lines {
        while ahead.iter().map(Vec::len).sum::<usize>() <= TRUNCATION_LOOKAHEAD {
            match file
                .next_chunk()
                .await
                .map_err(crate::service::guest_error)?
            {
                Some(c) => ahead.push(c),
                None => break,
            }
        }
        file.truncated()
    } else {
        Some(q.max_bytes.is_some_and(|m| total > m))
    };
    let mut resp = Body::from_stream(download(ahead, file)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(headers::FILE_SIZE, hv(total.to_string()));
    if let Some(t) = truncated {
        h.insert(headers::TRUNCATED, hv(t.to_string()));
    }
    h.insert(headers::FILE_MODE, hv(format!("{:o}", mode & 0o7777)));
    Ok(resp)
}

/// The body of a download: chunks read ahead, then the rest as the client
/// takes it. A failure mid-way aborts the response (the client sees a
/// short body, not a complete-looking one).
fn download(
    ahead: Vec<Vec<u8>>,
    file: bhatti_core::GuestFile,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let ahead = futures_util::stream::iter(ahead.into_iter().map(|c| Ok(Bytes::from(c))));
    let rest = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        match file.next_chunk().await {
            Ok(Some(c)) => Some((Ok(Bytes::from(c)), Some(file))),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %crate::error::error_chain(&e), "download ended early");
                Some((Err(std::io::Error::other(e.to_string())), None))
            }
        }
    });
    futures_util::StreamExt::chain(ahead, rest)
}

/// A file's size, kind and mode, without its bytes.
#[utoipa::path(
    head,
    path = "/sandboxes/{id}/files",
    operation_id = "stat_file",
    tag = "guest",
    params(("id" = String, Path, description = "The sandbox's id or name."), PathQuery),
    responses(
        (status = 200, description = "It exists.",
            headers(
                ("X-File-Size" = u64, description = "Size in bytes."),
                ("X-File-Kind" = String, description = "`file`, `dir`, `symlink` or `other`."),
                ("X-File-Mode" = String, description = "Permission bits, octal."),
            )
        ),
        (status = 403, description = "The guest refused access (no body: HEAD).", body = api_types::ErrorBody),
        Authed, Invalid, Missing, Guest
    )
)]
pub async fn head(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<PathQuery>,
) -> Result<Response, ApiError> {
    state.limit(&user, Class::Read)?;
    validate::guest_path(&q.path)?;
    let st = state.service.stat(&user, &id, &q.path).await?;
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert(headers::FILE_SIZE, hv(st.size.to_string()));
    h.insert(headers::FILE_KIND, hv(kind_name(st.kind).to_string()));
    h.insert(headers::FILE_MODE, hv(format!("{:o}", st.mode & 0o7777)));
    Ok(resp)
}

/// The upload's size from `Content-Length`: required (the agent writes a
/// file of a stated size), at most [`api_types::limits::MAX_FILE_BODY`].
pub fn upload_size(h: &HeaderMap) -> Result<u64, ApiError> {
    let limit = api_types::limits::MAX_FILE_BODY;
    let size = h
        .get(header::CONTENT_LENGTH)
        .ok_or_else(|| ApiError::LengthRequired("a file upload needs a Content-Length".into()))?
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| ApiError::BadRequest("invalid Content-Length".into()))?;
    if size > limit {
        return Err(ApiError::PayloadTooLarge(format!(
            "a file may be at most {limit} bytes"
        )));
    }
    Ok(size)
}

/// Writes a file from the raw body (streamed, atomic).
#[utoipa::path(
    put,
    path = "/sandboxes/{id}/files",
    operation_id = "write_file",
    tag = "guest",
    params(("id" = String, Path, description = "The sandbox's id or name."), WriteQuery),
    request_body(content = inline(crate::openapi::Binary), content_type = "application/octet-stream",
        description = "The file's bytes; `Content-Length` is required."),
    responses(
        (status = 200, description = "Written.", body = api_types::Written),
        (status = 403, description = "The guest refused access.", body = api_types::ErrorBody),
        (status = 411, description = "No `Content-Length`.", body = api_types::ErrorBody),
        (status = 413, description = "Over 100 MB.", body = api_types::ErrorBody),
        Authed, Invalid, Missing, Guest
    )
)]
pub async fn write(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<WriteQuery>,
    headers: HeaderMap,
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
    let size = upload_size(&headers)?;
    let opts = agent_client::WriteOptions {
        mode,
        ..Default::default()
    };
    let bytes = state
        .service
        .write_file(&user, &id, &q.path, size, BodyReader::new(body), opts)
        .await?;
    Ok(Json(api_types::Written {
        path: q.path,
        bytes,
    }))
}

/// A request body as an `AsyncRead`, frame by frame: nothing is read from
/// the client before the agent asks for it.
pub(crate) struct BodyReader {
    body: Body,
    pending: Bytes,
}

impl BodyReader {
    pub(crate) fn new(body: Body) -> BodyReader {
        BodyReader {
            body,
            pending: Bytes::new(),
        }
    }
}

impl tokio::io::AsyncRead for BodyReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        use hyper::body::Body as _;
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                // End of the body: EOF.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(std::io::Error::other(e.to_string())))
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.pending = data;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_need_a_length_within_the_limit() {
        let mut h = HeaderMap::new();
        assert!(matches!(upload_size(&h), Err(ApiError::LengthRequired(_))));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert_eq!(upload_size(&h).unwrap(), 12);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("x"));
        assert!(matches!(upload_size(&h), Err(ApiError::BadRequest(_))));
        let over = (api_types::limits::MAX_FILE_BODY + 1).to_string();
        h.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from_str(&over).unwrap(),
        );
        assert!(matches!(upload_size(&h), Err(ApiError::PayloadTooLarge(_))));
    }

    #[tokio::test]
    async fn a_body_reads_as_a_stream() {
        use tokio::io::AsyncReadExt;
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"ab")),
            Ok(Bytes::from_static(b"cde")),
        ];
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let mut out = String::new();
        BodyReader::new(body)
            .read_to_string(&mut out)
            .await
            .unwrap();
        assert_eq!(out, "abcde");
    }
}
