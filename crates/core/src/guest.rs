//! The guest surface of core: every call into a running sandbox's agent
//! (exec, files, sessions), each woken first and raced against the VMM's
//! exit, so a dead VM is reported as soon as it dies.

use std::future::Future;

use agent_client::{
    AgentClient, ClientError, ExecOutput, ExecStream, FileContent, Listing, SessionStream,
    WriteOptions,
};
use proto::{ExecRequest, FileRead, FileStat, SessionInfo, WindowSize};
use tracing::Instrument;

use crate::boot::exited;
use crate::error::{CoreError, Result};
use crate::id::SandboxId;
use crate::manager::SandboxManager;

impl SandboxManager {
    /// Runs an agent call, racing it against the VMM's exit.
    async fn with_agent<T, F, Fut>(
        &self,
        id: &SandboxId,
        operation: &'static str,
        call: F,
    ) -> Result<T>
    where
        F: FnOnce(AgentClient) -> Fut,
        Fut: Future<Output = std::result::Result<T, ClientError>>,
    {
        self.ensure_hot(id).await?;
        let entry = self.entry(id)?;
        let vm = self.running(&entry, operation)?;
        let span = tracing::debug_span!("agent", sandbox = %id, operation);
        let result = tokio::select! {
            r = call(vm.client.clone()).instrument(span) => r,
            exit = exited(&*vm.vmm) => return Err(self.mark_dead(&entry, &exit)),
        };
        result.map_err(|source| match vm.vmm.exit() {
            // The call failed because the VM died under it.
            Some(exit) if source.agent_code().is_none() => self.mark_dead(&entry, &exit),
            _ => CoreError::Agent {
                id: id.clone(),
                source,
            },
        })
    }

    /// The agent client of a running sandbox, for calls this type does not
    /// wrap (tunnels, activity). Not raced against the VMM's exit, and does
    /// not wake the sandbox: call [`SandboxManager::ensure_hot`] first.
    pub fn agent(&self, id: &SandboxId) -> Result<AgentClient> {
        let entry = self.entry(id)?;
        Ok(self.running(&entry, "reach the agent")?.client)
    }

    /// Runs a command to completion.
    pub async fn exec(&self, id: &SandboxId, req: ExecRequest) -> Result<ExecOutput> {
        self.with_agent(id, "exec", |c| async move { c.exec(req).await })
            .await
    }

    /// Starts a command and streams its output.
    pub async fn exec_stream(&self, id: &SandboxId, req: ExecRequest) -> Result<ExecStream> {
        self.with_agent(id, "exec", |c| async move { c.exec_stream(req).await })
            .await
    }

    /// Reads a file.
    pub async fn read_file(&self, id: &SandboxId, req: FileRead) -> Result<FileContent> {
        self.with_agent(id, "read a file", |c| async move { c.read_file(req).await })
            .await
    }

    /// Writes a file atomically.
    pub async fn write_file(
        &self,
        id: &SandboxId,
        path: &str,
        data: &[u8],
        opts: WriteOptions,
    ) -> Result<u64> {
        self.with_agent(id, "write a file", |c| async move {
            c.write_file(path, data, opts).await
        })
        .await
    }

    /// Metadata of a guest path.
    pub async fn stat(&self, id: &SandboxId, path: &str) -> Result<FileStat> {
        self.with_agent(id, "stat", |c| async move { c.stat(path).await })
            .await
    }

    /// Lists a guest directory.
    pub async fn ls(&self, id: &SandboxId, path: &str) -> Result<Listing> {
        self.with_agent(id, "list a directory", |c| async move { c.ls(path).await })
            .await
    }

    /// Starts a command in a new PTY session and attaches to it.
    pub async fn open_session(&self, id: &SandboxId, req: ExecRequest) -> Result<SessionStream> {
        self.with_agent(id, "open a session", |c| async move {
            c.open_session(req).await
        })
        .await
    }

    /// Attaches to an existing session (scrollback replayed first).
    pub async fn attach_session(
        &self,
        id: &SandboxId,
        name: &str,
        steal: bool,
        size: Option<WindowSize>,
    ) -> Result<SessionStream> {
        self.with_agent(id, "attach a session", |c| async move {
            c.attach(name, steal, size).await
        })
        .await
    }

    /// The sandbox's PTY sessions.
    pub async fn sessions(&self, id: &SandboxId) -> Result<Vec<SessionInfo>> {
        self.with_agent(id, "list sessions", |c| async move { c.sessions().await })
            .await
    }
}
