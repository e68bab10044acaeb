//! `GET /events`: the recorded history of the caller's sandboxes (every
//! user's for an admin key), listed or followed as NDJSON.

use std::collections::VecDeque;
use std::time::Duration;

use api_types::limits::{DEFAULT_EVENTS, MAX_EVENTS};
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use store::{EventFilter, EventRecord};

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::QueryParams;
use crate::openapi::{Authed, Invalid};
use crate::ratelimit::Class;
use crate::state::{blocking, AppState};

/// How often a follower looks for new events.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// A follower with nothing to send writes an empty line this often: a
/// client that went away is noticed (and its stream ended) then.
const FOLLOW_KEEPALIVE: Duration = Duration::from_secs(10);

/// Event streams one user may hold open at once; one more is a 429.
pub const MAX_FOLLOWERS_PER_USER: usize = 8;

/// Open event streams by user.
#[derive(Debug, Default)]
pub struct Followers(std::sync::Mutex<std::collections::HashMap<String, usize>>);

impl Followers {
    /// A place for one more of `user`'s streams, held until dropped.
    fn enter(self: &std::sync::Arc<Self>, user: &str) -> Option<FollowerSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(user.to_string()).or_insert(0);
        if *n >= MAX_FOLLOWERS_PER_USER {
            return None;
        }
        *n += 1;
        Some(FollowerSlot {
            followers: self.clone(),
            user: user.to_string(),
        })
    }
}

/// One open stream's place in [`Followers`].
#[derive(Debug)]
struct FollowerSlot {
    followers: std::sync::Arc<Followers>,
    user: String,
}

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        let mut open = self.followers.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    sandbox: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    limit: Option<u32>,
    #[serde(default)]
    follow: bool,
}

fn view(e: EventRecord) -> api_types::Event {
    api_types::Event {
        id: e.id,
        user_id: e.user_id,
        sandbox_id: e.sandbox_id,
        kind: e.kind,
        detail: e.detail,
        at: e.at,
    }
}

/// Events, oldest first: the newest `limit` matching ones; with
/// `follow=true` those, then every new one as it is recorded, one JSON
/// object a line, until the client goes or the daemon shuts down.
#[utoipa::path(
    get,
    path = "/events",
    operation_id = "list_events",
    tag = "observability",
    params(
        ("sandbox" = Option<String>, Query, description = "Only this sandbox's (id or name; a destroyed sandbox by its id)."),
        ("type" = Option<String>, Query, description = "Only events of this type (`running`, `cold`, `hot`, …)."),
        ("since" = Option<i64>, Query, description = "Only events at or after this time (Unix ms)."),
        ("until" = Option<i64>, Query, description = "Only events at or before this time (Unix ms); not with `follow`."),
        ("limit" = Option<u32>, Query, description = "At most this many (the newest): 1–1000, default 100."),
        ("follow" = Option<bool>, Query, description = "`true`: keep the response open and stream new events as NDJSON."),
    ),
    responses(
        (status = 200, description = "The caller's events (an admin key: everyone's), oldest first; with `follow=true` one `Event` a line, flushed as recorded.",
            content(
                (Vec<api_types::Event> = "application/json"),
                (api_types::Event = "application/x-ndjson"),
            )
        ),
        Authed, Invalid
    )
)]
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
    QueryParams(q): QueryParams<EventQuery>,
) -> Result<Response, ApiError> {
    state.limit(&user, Class::Read)?;
    let limit = q.limit.unwrap_or(DEFAULT_EVENTS);
    if limit == 0 || limit > MAX_EVENTS {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_EVENTS}"
        )));
    }
    if q.follow && q.until.is_some() {
        return Err(ApiError::BadRequest(
            "until cannot be combined with follow".into(),
        ));
    }
    if let Some(k) = &q.kind {
        if k.is_empty() || k.len() > 64 {
            return Err(ApiError::BadRequest(
                "type must be 1 to 64 characters".into(),
            ));
        }
    }
    let admin = state.is_admin(&user);
    let sandbox_id = match &q.sandbox {
        None => None,
        Some(key) => Some(resolve(&state, &user, admin, key).await?),
    };
    let filter = EventFilter {
        user_id: (!admin).then(|| user.id.clone()),
        sandbox_id,
        kind: q.kind.clone(),
        since: q.since,
        until: q.until,
        after_id: None,
        limit,
    };
    let store = state.store.clone();
    let f = filter.clone();
    let (cursor, backlog) = blocking(move || {
        // The cursor first: an event recorded meanwhile is either in the
        // backlog or after the cursor, never lost.
        let cursor = store.last_event_id()?;
        Ok((cursor, store.list_events(&f)?))
    })
    .await?;
    if !q.follow {
        return Ok(Json(backlog.into_iter().map(view).collect::<Vec<_>>()).into_response());
    }
    let cursor = backlog.iter().map(|e| e.id).max().unwrap_or(0).max(cursor);
    let slot = state
        .followers
        .enter(&user.id)
        .ok_or(ApiError::RateLimited {
            retry_after: Duration::from_secs(5),
        })?;
    let follower = Follower {
        _slot: slot,
        state: state.clone(),
        filter: EventFilter {
            after_id: Some(cursor),
            limit: MAX_EVENTS,
            ..filter
        },
        pending: backlog.into_iter().collect(),
        closing: state.closing.clone(),
        done: false,
        quiet_since: tokio::time::Instant::now(),
    };
    let stream = futures_util::stream::unfold(follower, |mut f| async move {
        f.next()
            .await
            .map(|line| (Ok::<_, std::io::Error>(line), f))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// A sandbox key (id or name) as the id its events are recorded under.
async fn resolve(
    state: &AppState,
    user: &store::UserRecord,
    admin: bool,
    key: &str,
) -> Result<String, ApiError> {
    let store = state.store.clone();
    let (uid, k) = (user.id.clone(), key.to_string());
    if !admin {
        let row = blocking(move || store.sandbox(&uid, &k)).await?;
        // Not (or no longer) there: its id may still name its events.
        return Ok(row.map(|r| r.id).unwrap_or_else(|| key.to_string()));
    }
    let rows = blocking(move || store.all_sandboxes()).await?;
    if rows.iter().any(|r| r.id == key) {
        return Ok(key.to_string());
    }
    let named: Vec<_> = rows.iter().filter(|r| r.name == key).collect();
    match named.as_slice() {
        [] => Ok(key.to_string()),
        [one] => Ok(one.id.clone()),
        _ => Err(ApiError::BadRequest(format!(
            "several users have a sandbox named '{key}'; use its id"
        ))),
    }
}

/// One follower's state: what it has yet to send and where it is.
struct Follower {
    _slot: FollowerSlot,
    state: AppState,
    filter: EventFilter,
    pending: VecDeque<EventRecord>,
    closing: tokio::sync::watch::Receiver<bool>,
    done: bool,
    /// When a line was last sent.
    quiet_since: tokio::time::Instant,
}

impl Follower {
    /// The next line to send; `None` ends the stream. At most
    /// [`MAX_EVENTS`] events are held at a time: the next batch is read
    /// only once these are sent.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                let line = serde_json::to_string(&view(e)).unwrap_or_else(|e| {
                    serde_json::json!({ "error": format!("cannot render an event: {e}") })
                        .to_string()
                });
                self.quiet_since = tokio::time::Instant::now();
                return Some(line + "\n");
            }
            if self.done || *self.closing.borrow() {
                return None;
            }
            let store = self.state.store.clone();
            let f = self.filter.clone();
            match blocking(move || store.list_events(&f)).await {
                Ok(batch) if batch.is_empty() => {
                    if self.quiet_since.elapsed() >= FOLLOW_KEEPALIVE {
                        self.quiet_since = tokio::time::Instant::now();
                        return Some("\n".into());
                    }
                    tokio::select! {
                        () = tokio::time::sleep(FOLLOW_POLL) => {}
                        changed = self.closing.changed() => {
                            // The daemon gone without saying: end too.
                            if changed.is_err() {
                                self.done = true;
                            }
                        }
                    }
                }
                Ok(batch) => {
                    self.filter.after_id = batch.last().map(|e| e.id).or(self.filter.after_id);
                    self.pending.extend(batch);
                }
                Err(e) => {
                    self.done = true;
                    return Some(serde_json::json!({ "error": e.to_string() }).to_string() + "\n");
                }
            }
        }
    }
}
