//! Publishing on the service: a sandbox port under a public alias (the
//! store's publications), the `published` list of inspect and list, and
//! whether a publication's sandbox must be woken (the public proxy's way
//! in is [`Service::public_proxy`]).

use std::collections::HashMap;

use api_types::{PublishPort, Published, Sandbox};
use bhatti_core::ThermalState;
use store::{NewPublication, PublicationRecord, StoreError, UserRecord};

use super::{internal, Service};
use crate::error::ApiError;
use crate::keys::random_hex;
use crate::publish::alias;
use crate::state::blocking;

/// How many random suffixes a default alias tries before giving up.
const DEFAULT_ALIAS_TRIES: usize = 5;

impl Service {
    fn published_view(&self, p: &PublicationRecord) -> Published {
        Published {
            port: p.port,
            alias: p.alias.clone(),
            url: self.config.publish.url_for(&p.alias),
            listening: None,
        }
    }

    /// Publishes a port of a sandbox of `user`; `Ok((false, …))` when the
    /// port already was, under the alias asked for (or any, when none was).
    pub async fn publish(
        &self,
        user: &UserRecord,
        id: &str,
        body: PublishPort,
    ) -> Result<(bool, Published), ApiError> {
        if !self.config.publish.enabled() {
            return Err(ApiError::Forbidden(
                "publishing is off on this daemon ([publish] listen is empty)".into(),
            ));
        }
        if body.port == 0 {
            return Err(ApiError::BadRequest("port must be 1-65535".into()));
        }
        let wanted = match &body.alias {
            Some(a) => Some(alias::parse(a).map_err(|e| ApiError::BadRequest(e.to_string()))?),
            None => None,
        };
        let row = self.row(user, id).await?;
        let port = body.port;

        // Already published: the same answer again, unless another alias
        // was asked for.
        let existing = {
            let store = self.store.clone();
            let sid = row.id.clone();
            blocking(move || store.publications_of_sandbox(&sid)).await?
        }
        .into_iter()
        .find(|p| p.port == port);
        if let Some(p) = existing {
            return match &wanted {
                Some(a) if *a != p.alias => Err(ApiError::Conflict(format!(
                    "port {port} of '{}' is already published as '{}'; unpublish it first",
                    row.name, p.alias
                ))),
                _ => Ok((false, self.with_listening(user, &row.id, port, &p).await)),
            };
        }

        let mut candidates: Vec<String> = match &wanted {
            Some(a) => vec![a.clone()],
            None => vec![alias::default_alias(&row.name, port, "")],
        };
        if wanted.is_none() {
            for _ in 0..DEFAULT_ALIAS_TRIES {
                let suffix = random_hex(2).map_err(internal)?;
                candidates.push(alias::default_alias(&row.name, port, &suffix));
            }
        }
        let mut last = None;
        for candidate in candidates {
            let new = NewPublication {
                id: format!("pub-{}", random_hex(6).map_err(internal)?),
                user_id: user.id.clone(),
                sandbox_id: row.id.clone(),
                port,
                alias: candidate,
            };
            let store = self.store.clone();
            let inserted = tokio::task::spawn_blocking(move || store.insert_publication(&new))
                .await
                .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?;
            match inserted {
                Ok(p) => {
                    self.event(
                        user,
                        &row.id,
                        "published",
                        serde_json::json!({"port": port, "alias": p.alias}),
                    )
                    .await;
                    tracing::info!(sandbox = %row.id, port, alias = %p.alias, "published");
                    return Ok((true, self.with_listening(user, &row.id, port, &p).await));
                }
                Err(StoreError::AliasTaken { alias }) => last = Some(alias),
                // A concurrent publish of the same port won.
                Err(e @ StoreError::PortPublished { .. }) => {
                    return Err(ApiError::Conflict(e.to_string()))
                }
                Err(e) => return Err(e.into()),
            }
        }
        let alias = last.unwrap_or_default();
        Err(ApiError::Conflict(if wanted.is_some() {
            format!("the alias '{alias}' is taken")
        } else {
            format!("no free alias for port {port} of '{}'; give one", row.name)
        }))
    }

    /// The view of a publication with `listening` filled in when the
    /// sandbox is hot (it is never woken to look).
    async fn with_listening(
        &self,
        user: &UserRecord,
        sid: &str,
        port: u16,
        p: &PublicationRecord,
    ) -> Published {
        let mut view = self.published_view(p);
        if !self.needs_wake(sid) {
            match self.ports(user, sid).await {
                Ok(ports) => view.listening = Some(ports.iter().any(|l| l.port == port)),
                Err(e) => tracing::debug!(sandbox = %sid, error = %e, "listing ports"),
            }
        }
        view
    }

    /// Unpublishes a port of a sandbox of `user`.
    pub async fn unpublish(&self, user: &UserRecord, id: &str, port: u16) -> Result<(), ApiError> {
        let row = self.row(user, id).await?;
        let store = self.store.clone();
        let sid = row.id.clone();
        let removed = tokio::task::spawn_blocking(move || store.delete_publication(&sid, port))
            .await
            .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?;
        match removed {
            Ok(p) => {
                self.event(
                    user,
                    &row.id,
                    "unpublished",
                    serde_json::json!({"port": port, "alias": p.alias}),
                )
                .await;
                Ok(())
            }
            Err(StoreError::NotFound { .. }) => Err(ApiError::NotFound(format!(
                "port {port} of '{}' is not published",
                row.name
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// A sandbox view with its publications.
    pub(super) async fn with_published(&self, mut sb: Sandbox) -> Result<Sandbox, ApiError> {
        let store = self.store.clone();
        let sid = sb.id.clone();
        let list = blocking(move || store.publications_of_sandbox(&sid)).await?;
        sb.published = list.iter().map(|p| self.published_view(p)).collect();
        Ok(sb)
    }

    /// Sandbox views of one user with their publications (one query).
    pub(super) async fn all_with_published(
        &self,
        user: &UserRecord,
        mut list: Vec<Sandbox>,
    ) -> Result<Vec<Sandbox>, ApiError> {
        let store = self.store.clone();
        let uid = user.id.clone();
        let all = blocking(move || store.publications_of_user(&uid)).await?;
        let mut by_sandbox: HashMap<&str, Vec<Published>> = HashMap::new();
        for p in &all {
            by_sandbox
                .entry(p.sandbox_id.as_str())
                .or_default()
                .push(self.published_view(p));
        }
        for sb in &mut list {
            sb.published = by_sandbox.remove(sb.id.as_str()).unwrap_or_default();
        }
        Ok(list)
    }

    /// Whether a request to this sandbox (store id) would have to wake it:
    /// it is warm or cold, or its VM is not running in this process
    /// (stopped after a restart).
    pub fn needs_wake(&self, sid: &str) -> bool {
        let Some(id) = self.running_id(sid) else {
            return true;
        };
        !matches!(self.core.get(&id), Ok(r) if r.thermal == ThermalState::Hot)
    }
}
