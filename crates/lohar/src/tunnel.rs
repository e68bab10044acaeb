//! Tunnels: a connection handed over to a TCP port in the guest.

use std::time::Duration;

use proto::{ErrorCode, Tunnel};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::failure::Failure;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `127.0.0.1:<port>` in the guest.
pub async fn connect(req: Tunnel) -> Result<TcpStream, Failure> {
    if req.port == 0 {
        return Err(Failure::bad_request("port 0 is not a valid tunnel target"));
    }
    // A socket address, not a host name: the static binary never resolves
    // names (static glibc cannot load NSS modules).
    let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, req.port));
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            s.set_nodelay(true).ok();
            Ok(s)
        }
        Ok(Err(e)) => Err(Failure::new(
            ErrorCode::ConnectFailed,
            format!("cannot connect to 127.0.0.1:{} in the guest: {e}", req.port),
        )),
        Err(_) => Err(Failure::new(
            ErrorCode::ConnectFailed,
            format!(
                "connecting to 127.0.0.1:{} in the guest timed out after {}s",
                req.port,
                CONNECT_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Relays bytes both ways until either side closes. `early` holds bytes the
/// client sent right behind its tunnel request.
pub async fn relay<S>(mut client: S, early: Vec<u8>, mut target: TcpStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !early.is_empty() {
        if let Err(e) = target.write_all(&early).await {
            tracing::debug!(error = %e, "tunnel target closed early");
            return;
        }
    }
    match tokio::io::copy_bidirectional(&mut client, &mut target).await {
        Ok((up, down)) => tracing::debug!(up, down, "tunnel closed"),
        Err(e) => tracing::debug!(error = %e, "tunnel ended with an error"),
    }
}
