//! `bhatti mcp`: the MCP server (crate `mcp`) on stdin/stdout, its tools
//! calling the daemon's REST API with this client's URL and key (the same
//! flags, environment and config file as every other command). Nothing
//! but MCP messages is written to stdout.

use std::sync::Arc;

use api_types::{
    headers, CreateSandbox, ExecBody, ExecResult, PublishPort, Published, Sandbox, Written,
};
use mcp::{Backend, FileContent, ToolFailure};

use crate::client::Client;
use crate::error::{CliError, Result};

/// Serves MCP on stdio until stdin closes.
pub async fn serve(client: Client) -> Result<u8> {
    // Without a key every tool would fail: say so now, once.
    client.token()?;
    let server = Arc::new(mcp::Server::new(Tools { client }));
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    mcp::stdio::serve(server, stdin, tokio::io::stdout())
        .await
        .map_err(CliError::Output)?;
    Ok(0)
}

#[derive(Debug)]
struct Tools {
    client: Client,
}

fn failure(e: CliError) -> ToolFailure {
    ToolFailure(e.to_string())
}

#[async_trait::async_trait]
impl Backend for Tools {
    async fn create(&self, body: CreateSandbox) -> std::result::Result<Sandbox, ToolFailure> {
        self.client
            .create(&body)
            .await
            .map(|(s, _)| s)
            .map_err(failure)
    }

    async fn list(&self) -> std::result::Result<Vec<Sandbox>, ToolFailure> {
        self.client.list().await.map_err(failure)
    }

    async fn exec(
        &self,
        sandbox: &str,
        body: ExecBody,
    ) -> std::result::Result<ExecResult, ToolFailure> {
        self.client.exec(sandbox, &body).await.map_err(failure)
    }

    async fn read_file(
        &self,
        sandbox: &str,
        path: &str,
        max_bytes: u64,
    ) -> std::result::Result<FileContent, ToolFailure> {
        let resp = self
            .client
            .read_file(sandbox, path, None, None, Some(max_bytes))
            .await
            .map_err(failure)?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let size = header(headers::FILE_SIZE).and_then(|s| s.parse::<u64>().ok());
        let truncated = header(headers::TRUNCATED).is_some_and(|t| t == "true");
        let data = resp
            .bytes()
            .await
            .map_err(|e| failure(self.client.transport_error(e)))?
            .to_vec();
        Ok(FileContent {
            size: size.unwrap_or(data.len() as u64),
            truncated,
            data,
        })
    }

    async fn write_file(
        &self,
        sandbox: &str,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> std::result::Result<Written, ToolFailure> {
        self.client
            .write_file(sandbox, path, mode, data)
            .await
            .map_err(failure)
    }

    async fn publish(
        &self,
        sandbox: &str,
        body: PublishPort,
    ) -> std::result::Result<Published, ToolFailure> {
        self.client.publish(sandbox, &body).await.map_err(failure)
    }

    async fn destroy(&self, sandbox: &str) -> std::result::Result<(), ToolFailure> {
        self.client.destroy(sandbox).await.map_err(failure)
    }
}
