//! `bhatti bench proxy`: a daemon in this process (temp data dir, port 0,
//! its own bridge and TAP names, no firewall), one tiny sandbox serving a
//! small file with busybox httpd, and an HTTP GET of it through the
//! daemon's authenticated proxy against the same GET straight through an
//! agent tunnel (a new tunnel and one hyper request per sample: what the
//! proxy does inside). Interleaved, so drift hits both alike.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

use super::stats::{header, row, Samples};

/// Size of the file fetched.
const FILE_BYTES: usize = 1024;
const GUEST_PORT: u16 = 8080;

#[derive(Debug, clap::Args)]
pub struct ProxyBenchArgs {
    /// Data directory holding the built images (`bhatti image build`).
    #[arg(long, default_value = "/var/lib/bhatti")]
    data_dir: PathBuf,
    /// Samples per measured path.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// The bench's own subnet.
    #[arg(long, default_value = "10.214.0.0/24")]
    subnet: String,
}

pub fn run(args: ProxyBenchArgs) -> anyhow::Result<()> {
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let daemon = super::ScratchDaemon::new("proxy", 'p', &args.data_dir, &args.subnet, "tiny")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(measure(daemon.config.clone(), args.samples))
}

/// One GET of `path` over a fresh agent tunnel: the proxy's inner path.
async fn get_via_tunnel(agent: &agent_client::AgentClient, path: &str) -> anyhow::Result<Bytes> {
    let tunnel = agent.tunnel(GUEST_PORT).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tunnel)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "bench tunnel connection");
        }
    });
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("127.0.0.1:{GUEST_PORT}"))
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("GET {path} through the tunnel: {}", resp.status());
    }
    Ok(resp.into_body().collect().await?.to_bytes())
}

async fn measure(config: api::DaemonConfig, n: usize) -> anyhow::Result<()> {
    let d = super::BenchDaemon::start(config, "proxy", n, "path").await?;
    let (base, key) = (d.base.clone(), d.key.clone());
    // One keep-alive connection to the daemon, as a browser would hold.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()?;
    let agent = d.create_sandbox(&http).await?;
    let setup = format!(
        "mkdir -p /tmp/www && head -c {FILE_BYTES} /dev/zero | tr '\\0' x > /tmp/www/small.txt && httpd -p {GUEST_PORT} -h /tmp/www"
    );
    let out = agent
        .exec(proto::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), setup],
            ..Default::default()
        })
        .await?;
    if out.exit.code != 0 {
        bail!(
            "starting busybox httpd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let proxied_url = format!("{base}/sandboxes/bench/proxy/{GUEST_PORT}/small.txt");
    let get_proxied = || async {
        let body = http
            .get(&proxied_url)
            .bearer_auth(&key)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        anyhow::Ok(body)
    };
    let inspect_url = format!("{base}/sandboxes/bench");

    // Warm up every path (and wait for httpd to be up).
    let t = Instant::now();
    loop {
        match get_via_tunnel(&agent, "/small.txt").await {
            Ok(_) => break,
            Err(e) if t.elapsed() < Duration::from_secs(30) => {
                tracing::debug!(error = %e, "httpd not up yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.context("busybox httpd never answered")),
        }
    }
    for _ in 0..10 {
        get_proxied().await?;
        get_via_tunnel(&agent, "/small.txt").await?;
    }

    let (mut proxied, mut direct, mut tunnel_open, mut api_floor) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    for _ in 0..n {
        let t = Instant::now();
        let body = get_proxied().await?;
        proxied.push(t.elapsed());
        if body.len() != FILE_BYTES {
            bail!("got {} bytes through the proxy", body.len());
        }

        let t = Instant::now();
        let body = get_via_tunnel(&agent, "/small.txt").await?;
        direct.push(t.elapsed());
        if body.len() != FILE_BYTES {
            bail!("got {} bytes through the tunnel", body.len());
        }

        // Where the time goes: opening a tunnel alone, and an
        // authenticated API round trip that never reaches the guest.
        let t = Instant::now();
        drop(agent.tunnel(GUEST_PORT).await?);
        tunnel_open.push(t.elapsed());
        let t = Instant::now();
        http.get(&inspect_url)
            .bearer_auth(&key)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        api_floor.push(t.elapsed());
    }

    println!("{}", header().replace("raw", "tun"));
    println!("{}", row("GET 1 KiB (proxy vs tunnel)", &proxied, &direct));
    println!("{}", row("tunnel open only", &tunnel_open, &direct));
    println!(
        "{}",
        row("GET /sandboxes/:id (no guest)", &api_floor, &direct)
    );

    d.finish(&http).await?;
    println!(
        "proxy_overhead_ratio_p50={:.3}",
        proxied.p50().as_secs_f64() / direct.p50().as_secs_f64().max(1e-9)
    );
    Ok(())
}
