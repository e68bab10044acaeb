//! The service's one way into a guest: every operation handlers offer
//! (exec collected, streamed or detached; file read, write, stat and list;
//! PTY sessions; ports; tunnels; the reverse proxy) as `(user, sandbox
//! reference, request)`. Each finds the sandbox once (booting a stopped
//! one, waking a warm or cold one), then calls core's guest surface, which
//! runs it under a deadline raced against the VMM's exit. Errors come back
//! typed: a VM that died is a 502, a deadline that passed a 504.
//!
//! Also here: [`KeepHot`], the activity mark both proxies hold while
//! traffic flows.

use std::time::Duration;

use agent_client::{ClientError, ExecOutput, Listing, WriteOptions};
use axum::extract::Request;
use axum::response::Response;
use bhatti_core::{
    CoreError, GuestExec, GuestFile, GuestSession, GuestTunnel, SandboxId, SandboxManager,
};
use proto::{ExecRequest, FileRead, FileStat, ListeningPort, SessionInfo, Started, WindowSize};
use store::{PublicationRecord, UserRecord};
use tokio::io::AsyncRead;

use super::Service;
use crate::error::{error_chain, ApiError};
use crate::state::blocking;

/// How a PTY attachment is asked for (the shell WebSocket's open message).
#[derive(Debug, Clone, Default)]
pub struct ShellRequest {
    /// The session to attach to (or to create under this name).
    pub session: Option<String>,
    /// Always start a new session, even if one of this name exists.
    pub new: bool,
    /// Take the session over from a client already attached.
    pub steal: bool,
    pub size: Option<WindowSize>,
    /// The command of a new session (default: a login shell).
    pub cmd: Option<Vec<String>>,
}

/// Maps an error of a guest operation to the API's: the agent's own
/// refusals keep their meaning (404, 400, 403, 409, 429), a deadline is a
/// 504, a dead VM or broken exchange a 502.
pub fn guest_error(e: CoreError) -> ApiError {
    match e {
        CoreError::Agent { source, .. } => match source {
            ClientError::Timeout { .. } => {
                ApiError::GatewayTimeout(format!("sandbox agent: {}", error_chain(&source)))
            }
            other => ApiError::from(other),
        },
        e @ CoreError::VmmExited { .. } => ApiError::BadGateway(error_chain(&e)),
        other => ApiError::from(other),
    }
}

impl Service {
    /// The sandbox's core id after an operation failed: a VM that died is
    /// recorded as failed now, not on the next request.
    async fn after_failure(&self, user: &UserRecord, key: &str, e: CoreError) -> ApiError {
        if e.is_dead() {
            // The lookup notices the dead VM and records it.
            if let Err(now) = self.find_awake(user, key).await {
                tracing::debug!(sandbox = %key, error = %now, "recorded a dead VM");
            }
        }
        guest_error(e)
    }

    /// Finds, boots or wakes a sandbox without calling into it (a shell
    /// checks this before its WebSocket upgrade, so a missing sandbox is
    /// an HTTP answer).
    /// Awaits a guest agent call, timing it into the metrics.
    async fn timed<T>(&self, call: &'static str, f: impl std::future::Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let out = f.await;
        self.metrics
            .agent_call(call, started.elapsed().as_secs_f64());
        out
    }

    pub async fn wake(&self, user: &UserRecord, key: &str) -> Result<(), ApiError> {
        self.find_awake(user, key).await.map(|_| ())
    }

    /// Runs a command to completion. Each output stream keeps at most
    /// `limits.max_exec_output` bytes; the rest is read and dropped (the
    /// command runs to its end or timeout) and the output says truncated.
    pub async fn exec(
        &self,
        user: &UserRecord,
        key: &str,
        req: ExecRequest,
    ) -> Result<ExecOutput, ApiError> {
        let id = self.find_awake(user, key).await?;
        let cap = self.config.limits.max_exec_output;
        match self
            .timed("exec", self.core.exec_capped(&id, req, cap))
            .await
        {
            Ok(out) => Ok(out),
            Err(e) => Err(self.after_failure(user, key, e).await),
        }
    }

    /// Starts a command and streams its output (pulled: a slow reader slows
    /// the command's pipe).
    pub async fn exec_stream(
        &self,
        user: &UserRecord,
        key: &str,
        req: ExecRequest,
    ) -> Result<GuestExec, ApiError> {
        let id = self.find_awake(user, key).await?;
        match self.core.exec_stream(&id, req).await {
            Ok(s) => Ok(s),
            Err(e) => Err(self.after_failure(user, key, e).await),
        }
    }

    /// Starts a detached command; its pid and log file.
    pub async fn spawn(
        &self,
        user: &UserRecord,
        key: &str,
        req: ExecRequest,
    ) -> Result<Started, ApiError> {
        let id = self.find_awake(user, key).await?;
        match self.timed("spawn", self.core.spawn(&id, req)).await {
            Ok(s) => Ok(s),
            Err(e) => Err(self.after_failure(user, key, e).await),
        }
    }

    /// Starts a streamed file read: the file's size and mode now, its data
    /// chunk by chunk as the caller pulls it.
    pub async fn read_file(
        &self,
        user: &UserRecord,
        key: &str,
        req: FileRead,
    ) -> Result<GuestFile, ApiError> {
        let id = self.find_awake(user, key).await?;
        match self.core.read_file_stream(&id, req).await {
            Ok(f) => Ok(f),
            Err(e) => Err(self.after_failure(user, key, e).await),
        }
    }

    /// Writes `size` bytes from `source` to a guest file atomically. The
    /// sandbox is found first; the source is read only then, chunk by
    /// chunk, as the agent takes it.
    pub async fn write_file<R: AsyncRead + Unpin>(
        &self,
        user: &UserRecord,
        key: &str,
        path: &str,
        size: u64,
        source: R,
        opts: WriteOptions,
    ) -> Result<u64, ApiError> {
        let id = self.find_awake(user, key).await?;
        match self
            .core
            .write_file_stream(&id, path, size, source, opts)
            .await
        {
            Ok(n) => Ok(n),
            Err(e) => Err(self.after_failure(user, key, e).await),
        }
    }

    /// Metadata of a guest path.
    pub async fn stat(
        &self,
        user: &UserRecord,
        key: &str,
        path: &str,
    ) -> Result<FileStat, ApiError> {
        let id = self.find_awake(user, key).await?;
        match self.timed("stat", self.core.stat(&id, path)).await {
            Ok(s) => Ok(s),
            Err(e) => Err(self.after_failure(user, key, e).await),
        }
    }

    /// Lists a guest directory.
    pub async fn ls(&self, user: &UserRecord, key: &str, path: &str) -> Result<Listing, ApiError> {
        let id = self.find_awake(user, key).await?;
        match self.timed("ls", self.core.ls(&id, path)).await {
            Ok(l) => Ok(l),
            Err(e) => Err(self.after_failure(user, key, e).await),
        }
    }

    /// The sandbox's PTY sessions.
    pub async fn sessions(
        &self,
        user: &UserRecord,
        key: &str,
    ) -> Result<Vec<SessionInfo>, ApiError> {
        let id = self.find_awake(user, key).await?;
        match self.timed("sessions", self.core.sessions(&id)).await {
            Ok(s) => Ok(s),
            Err(e) => Err(self.after_failure(user, key, e).await),
        }
    }

    /// The TCP ports listening in the guest.
    pub async fn ports(
        &self,
        user: &UserRecord,
        key: &str,
    ) -> Result<Vec<ListeningPort>, ApiError> {
        let id = self.find_awake(user, key).await?;
        match self.core.ports(&id).await {
            Ok(p) => Ok(p),
            Err(e) => Err(self.after_failure(user, key, e).await),
        }
    }

    /// Attaches to a PTY session: the named one if it exists (unless `new`),
    /// else a new one running `cmd` (default `/bin/bash -l`, or `/bin/sh
    /// -l` on images without bash).
    pub async fn shell(
        &self,
        user: &UserRecord,
        key: &str,
        r: ShellRequest,
    ) -> Result<GuestSession, ApiError> {
        let id = self.find_awake(user, key).await?;
        match self.open_shell(&id, r).await {
            Ok(s) => Ok(s),
            Err(e) => Err(self.after_failure(user, key, e).await),
        }
    }

    async fn open_shell(&self, id: &SandboxId, r: ShellRequest) -> Result<GuestSession, CoreError> {
        if let (Some(name), false) = (&r.session, r.new) {
            match self.core.attach_session(id, name, r.steal, r.size).await {
                Ok(s) => return Ok(s),
                Err(e) if agent_code(&e) == Some(proto::ErrorCode::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        let default_shell = r.cmd.is_none();
        let mut req = ExecRequest {
            argv: r
                .cmd
                .unwrap_or_else(|| vec!["/bin/bash".into(), "-l".into()]),
            session: r.session,
            size: r.size,
            ..Default::default()
        };
        match self.core.open_session(id, req.clone()).await {
            // Images without bash (tiny) fall back to sh.
            Err(e) if default_shell && agent_code(&e) == Some(proto::ErrorCode::SpawnFailed) => {
                req.argv = vec!["/bin/sh".into(), "-l".into()];
                self.core.open_session(id, req).await
            }
            other => other,
        }
    }

    /// Opens a raw tunnel to a guest port, and the activity mark to hold
    /// for as long as it carries traffic. A port nobody listens on is a
    /// 502 that says so.
    pub async fn tunnel(
        &self,
        user: &UserRecord,
        key: &str,
        port: u16,
    ) -> Result<(GuestTunnel, KeepHot), ApiError> {
        let id = self.find_awake(user, key).await?;
        match self.core.tunnel(&id, port).await {
            Ok(t) => Ok((t, self.keep_hot(&id))),
            Err(e) if e.is_dead() => Err(self.after_failure(user, key, e).await),
            Err(e) => Err(crate::proxy::tunnel_failure(e, port, key).into()),
        }
    }

    /// Forwards one HTTP request to a guest port ([`crate::proxy::forward`])
    /// and keeps the sandbox hot while the exchange lasts; `held` lives as
    /// long too. `label` names the sandbox in error messages. Finding the
    /// sandbox can fail (an `Err`); the exchange's own failures are
    /// rendered as JSON error responses.
    #[allow(clippy::too_many_arguments)]
    pub async fn proxy<H: Send + Sync + Unpin + 'static>(
        &self,
        user: &UserRecord,
        key: &str,
        port: u16,
        req: Request,
        target: &str,
        label: &str,
        held: H,
    ) -> Result<Response, ApiError> {
        let id = self.find_awake(user, key).await?;
        let keep_hot = self.keep_hot(&id);
        Ok(crate::proxy::forward_holding(
            self.core.tunnel(&id, port),
            port,
            label,
            req,
            target,
            (held, keep_hot),
        )
        .await)
    }

    /// The public proxy's way in: wakes the sandbox behind a publication as
    /// its owner would (no API key), releases `waking` (a wake permit) once
    /// it is up, and forwards to the published port, never another.
    pub async fn public_proxy<W, H: Send + Sync + Unpin + 'static>(
        &self,
        p: &PublicationRecord,
        waking: W,
        req: Request,
        target: &str,
        alias: &str,
        held: H,
    ) -> Result<Response, ApiError> {
        let store = self.store.clone();
        let uid = p.user_id.clone();
        let user = blocking(move || store.user_by_id(&uid))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no publication '{}'", p.alias)))?;
        self.find_awake(&user, &p.sandbox_id).await?;
        drop(waking);
        self.proxy(&user, &p.sandbox_id, p.port, req, target, alias, held)
            .await
    }

    /// A separate agent client for a sandbox (its own connection pool,
    /// built from the sandbox's record), for `bhatti bench api`, which
    /// measures what the API adds over talking to the agent directly.
    /// Handlers never use it: they go through the operations above.
    pub async fn bench_agent_client(
        &self,
        user: &UserRecord,
        key: &str,
    ) -> Result<agent_client::AgentClient, ApiError> {
        let id = self.find_awake(user, key).await?;
        let record = self.core.get(&id).map_err(guest_error)?;
        let ip = record.network.as_ref().map(|a| a.ip).ok_or_else(|| {
            ApiError::Unavailable(format!("sandbox '{key}' has no network attachment"))
        })?;
        let endpoint = agent_client::Endpoint::Tcp((ip, bhatti_core::AGENT_PORT).into());
        Ok(agent_client::AgentClient::new(
            endpoint,
            record.token.expose(),
        ))
    }

    /// How often a sandbox carrying a long exchange is marked in use: well
    /// within the idle time after which it is paused.
    pub fn keep_hot_every(&self) -> Duration {
        (Duration::from_secs(self.config.thermal.warm_after_secs.max(1)) / 3)
            .max(Duration::from_millis(100))
    }

    /// Marks a sandbox in use at a steady pace for as long as the returned
    /// value lives.
    pub(crate) fn keep_hot(&self, id: &SandboxId) -> KeepHot {
        KeepHot::start(self.core.clone(), id.clone(), self.keep_hot_every())
    }
}

fn agent_code(e: &CoreError) -> Option<proto::ErrorCode> {
    match e {
        CoreError::Agent { source, .. } => source.agent_code(),
        _ => None,
    }
}

/// Marks a sandbox in use at a steady pace while it lives, so one that
/// streams a response (server-sent events, a download), holds a WebSocket
/// or carries a forwarded connection is not paused under the traffic for
/// lack of API requests (a paused guest would leave the connection
/// hanging: bytes on an open tunnel do not wake it). Shared by the
/// authenticated proxy, tunnels and the public proxy.
#[derive(Debug)]
pub struct KeepHot(tokio::task::JoinHandle<()>);

impl KeepHot {
    fn start(core: SandboxManager, id: SandboxId, every: Duration) -> KeepHot {
        KeepHot(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                core.touch(&id);
            }
        }))
    }
}

impl Drop for KeepHot {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn agent(source: ClientError) -> CoreError {
        CoreError::Agent {
            id: "sb-0123456789ab".parse().unwrap(),
            source,
        }
    }

    #[test]
    fn deadlines_are_504_dead_vms_502_and_agent_refusals_keep_their_meaning() {
        let timeout = agent(ClientError::Timeout {
            operation: "exec",
            after: Duration::from_secs(30),
        });
        assert_eq!(guest_error(timeout).status(), StatusCode::GATEWAY_TIMEOUT);
        let dead = CoreError::VmmExited {
            id: "sb-0123456789ab".parse().unwrap(),
            reason: "killed by signal 9".into(),
            serial_tail: String::new(),
        };
        let e = guest_error(dead);
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(e.to_string().contains("is dead"), "{e}");
        let closed = agent(ClientError::Closed { operation: "exec" });
        assert_eq!(guest_error(closed).status(), StatusCode::BAD_GATEWAY);
        for (code, status) in [
            (proto::ErrorCode::NotFound, StatusCode::NOT_FOUND),
            (proto::ErrorCode::PermissionDenied, StatusCode::FORBIDDEN),
            (proto::ErrorCode::FileTooLarge, StatusCode::BAD_REQUEST),
            (proto::ErrorCode::SessionAttached, StatusCode::CONFLICT),
            (
                proto::ErrorCode::TooManyConnections,
                StatusCode::TOO_MANY_REQUESTS,
            ),
        ] {
            let e = agent(ClientError::Agent {
                code,
                message: "m".into(),
            });
            assert_eq!(guest_error(e).status(), status, "{code:?}");
        }
    }
}
