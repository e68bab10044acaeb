//! `bhatti forward`: a local TCP port whose connections each open a tunnel
//! WebSocket (`GET /sandboxes/:id/tunnel/:port`, docs/api.md) and carry
//! their bytes both ways: any TCP protocol, not only HTTP.

use std::net::{IpAddr, SocketAddr};

use futures_util::{SinkExt, StreamExt};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Client;
use crate::error::{CliError, Result};

/// Bytes read from a local connection per WebSocket frame.
const CHUNK: usize = 64 * 1024;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What `bhatti forward` was asked for.
#[derive(Debug, Clone)]
pub struct ForwardRequest {
    pub sandbox: String,
    pub port: u16,
    /// 0: any free port.
    pub local_port: u16,
    pub bind: IpAddr,
}

/// The line printed once the local port listens.
pub fn banner(local: SocketAddr, sandbox: &str, port: u16) -> String {
    format!("Forwarding {local} -> {sandbox}:{port} (Ctrl+C to stop)")
}

/// Listens and forwards until SIGINT or SIGTERM.
pub async fn run(client: &Client, req: &ForwardRequest) -> Result<()> {
    // A sandbox that does not exist (or is not ours) fails now, not on
    // the first connection.
    client.get(&req.sandbox).await?;
    let listener = TcpListener::bind((req.bind, req.local_port))
        .await
        .map_err(|source| CliError::Bind {
            addr: SocketAddr::new(req.bind, req.local_port),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| CliError::Bind {
        addr: SocketAddr::new(req.bind, req.local_port),
        source,
    })?;
    println!("{}", banner(local, &req.sandbox, req.port));
    match client.ports(&req.sandbox).await {
        Ok(list) if !list.ports.iter().any(|p| p.port == req.port) => eprintln!(
            "note: nothing listens on port {} in {} yet; connections are refused until something does",
            req.port, req.sandbox
        ),
        _ => {}
    }
    let mut int = signal(SignalKind::interrupt()).map_err(CliError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(CliError::Signals)?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let client = client.clone();
                    let req = req.clone();
                    tokio::spawn(async move {
                        if let Err(e) = forward_one(&client, &req, tcp).await {
                            eprintln!("bhatti: forward: connection from {peer}: {e}");
                        }
                    });
                }
                Err(e) => eprintln!("bhatti: forward: accept: {e}"),
            },
            _ = int.recv() => break,
            _ = term.recv() => break,
        }
    }
    Ok(())
}

async fn connect(client: &Client, req: &ForwardRequest) -> Result<Ws> {
    let url = client.tunnel_url(&req.sandbox, req.port).to_string();
    let mut wsreq = url
        .as_str()
        .into_client_request()
        .map_err(|e| crate::shell::ws_error(&url, e))?;
    let auth = HeaderValue::from_str(&format!("Bearer {}", client.token()?))
        .map_err(|_| CliError::NoToken)?;
    wsreq.headers_mut().insert(AUTHORIZATION, auth);
    let ws = client.websocket(&url, wsreq).await?;
    Ok(ws)
}

/// One local connection through one tunnel. An empty binary frame is a
/// half-close (either way); a close frame ends both directions.
async fn forward_one(client: &Client, req: &ForwardRequest, tcp: TcpStream) -> Result<()> {
    tcp.set_nodelay(true).ok();
    let ws = match connect(client, req).await {
        Ok(ws) => ws,
        Err(e) => {
            close_gently(tcp).await;
            return Err(e);
        }
    };
    let url = client.tunnel_url(&req.sandbox, req.port).to_string();
    let ws_err = |e| crate::shell::ws_error(&url, e);
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut rd, mut wr) = tcp.into_split();

    // Local → sandbox, then the half-close marker.
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = rd.read(&mut buf).await.map_err(CliError::LocalConn)?;
            if n == 0 {
                ws_tx
                    .send(Message::binary(Vec::new()))
                    .await
                    .map_err(ws_err)?;
                return Ok::<_, CliError>(ws_tx);
            }
            ws_tx
                .send(Message::binary(buf[..n].to_vec()))
                .await
                .map_err(ws_err)?;
        }
    };
    // Sandbox → local; true when the sandbox side half-closed (more may
    // still go up), false when the tunnel ended.
    let down = async {
        while let Some(msg) = ws_rx.next().await {
            match msg.map_err(ws_err)? {
                Message::Binary(b) if b.is_empty() => {
                    wr.shutdown().await.map_err(CliError::LocalConn)?;
                    return Ok::<_, CliError>(true);
                }
                Message::Binary(b) => wr.write_all(&b).await.map_err(CliError::LocalConn)?,
                Message::Close(_) => return Ok(false),
                _ => {}
            }
        }
        Ok(false)
    };
    tokio::pin!(up, down);
    tokio::select! {
        up_done = &mut up => {
            let mut tx = up_done?;
            down.await?;
            let _ = tx.send(Message::Close(None)).await;
        }
        down_done = &mut down => {
            if down_done? {
                let mut tx = up.await?;
                let _ = tx.send(Message::Close(None)).await;
            }
        }
    }
    Ok(())
}

/// Ends a local connection the tunnel refused with a FIN rather than a
/// reset: what the client already sent is read and dropped (for at most
/// a couple of seconds) before the socket closes.
async fn close_gently(mut tcp: TcpStream) {
    if tcp.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let drain = async {
        while let Ok(n) = tcp.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_banner_names_both_ends() {
        assert_eq!(
            banner("127.0.0.1:3000".parse().unwrap(), "dev", 3000),
            "Forwarding 127.0.0.1:3000 -> dev:3000 (Ctrl+C to stop)"
        );
    }
}
