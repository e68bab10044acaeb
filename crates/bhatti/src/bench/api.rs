//! `bhatti bench api`: a daemon in this process (temp data dir, port 0,
//! its own bridge and TAP names), one sandbox, and the API measured against
//! the same operations straight through the agent client.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;

use super::stats::{header, row, Samples};

#[derive(Debug, clap::Args)]
pub struct ApiBenchArgs {
    /// Data directory holding the built images (`bhatti image build`).
    #[arg(long, default_value = "/var/lib/bhatti")]
    data_dir: PathBuf,
    /// Image of the sandbox measured.
    #[arg(long, default_value = "tiny")]
    image: String,
    /// Samples per measured operation.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// The bench's own subnet.
    #[arg(long, default_value = "10.213.0.0/24")]
    subnet: String,
    /// Serve the API over HTTPS (a certificate made for the run) and
    /// compare exec over HTTPS with exec over plain HTTP (a second socket
    /// on the same daemon); the last line is
    /// `api_tls_overhead_ratio_p50=<https ÷ http>`.
    #[arg(long)]
    tls: bool,
}

pub fn run(args: ApiBenchArgs) -> anyhow::Result<()> {
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let mut daemon =
        super::ScratchDaemon::new("api", 'a', &args.data_dir, &args.subnet, &args.image)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.tls {
        let pki = tempfile::Builder::new()
            .prefix("bhatti-bench-tls-")
            .tempdir()?;
        let cert = self_signed(pki.path())?;
        daemon.config.tls = api::tls::TlsConfig {
            cert_file: Some(pki.path().join("cert.pem")),
            key_file: Some(pki.path().join("key.pem")),
        };
        return rt.block_on(measure_tls(daemon.config.clone(), args.iterations, cert));
    }
    rt.block_on(measure(daemon.config.clone(), args.iterations))
}

/// A self-signed certificate for 127.0.0.1 in `dir` (`cert.pem`,
/// `key.pem`); its PEM.
fn self_signed(dir: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?.self_signed(&key)?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok(cert.pem().into_bytes())
}

/// `bench api --tls`: exec `true` through the same daemon over HTTPS and
/// over plain HTTP, interleaved; on kept-alive connections (the steady
/// state of an SDK) and on a new connection per request (what one CLI
/// command pays, the handshake included).
async fn measure_tls(config: api::DaemonConfig, n: usize, cert: Vec<u8>) -> anyhow::Result<()> {
    let d = super::BenchDaemon::start(config, "api --tls", n, "operation").await?;
    let (tls_base, key) = (d.base.clone(), d.key.clone());
    let plain_base = d
        .plain_base
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the daemon has no plain socket"))?;
    let client = |fresh: bool| {
        let mut b =
            reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(&cert)?]);
        if fresh {
            b = b.pool_max_idle_per_host(0);
        }
        anyhow::Ok(b.build()?)
    };
    let (kept, fresh) = (client(false)?, client(true)?);
    let t = Instant::now();
    let _agent = d.create_sandbox(&kept).await?;
    println!(
        "sandbox created in {:.0} ms (over HTTPS)",
        t.elapsed().as_secs_f64() * 1000.0
    );
    let exec_body = json!({"cmd": ["true"]});
    let exec = |http: &reqwest::Client, base: &str| {
        http.post(format!("{base}/sandboxes/bench/exec"))
            .bearer_auth(&key)
            .json(&exec_body)
            .send()
    };
    async fn timed(
        rb: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    ) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let v: serde_json::Value = rb.await?.error_for_status()?.json().await?;
        let took = t.elapsed();
        if v["exit_code"] != 0 {
            bail!("`true` failed through the API: {v}");
        }
        Ok(took)
    }
    for _ in 0..10 {
        timed(exec(&kept, &tls_base)).await?;
        timed(exec(&kept, &plain_base)).await?;
    }
    let (mut https, mut http, mut https_new, mut http_new) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    for _ in 0..n {
        // Interleaved, so drift hits both alike.
        https.push(timed(exec(&kept, &tls_base)).await?);
        http.push(timed(exec(&kept, &plain_base)).await?);
        https_new.push(timed(exec(&fresh, &tls_base)).await?);
        http_new.push(timed(exec(&fresh, &plain_base)).await?);
    }
    println!("{}", header().replace("raw", "http"));
    println!("{}", row("exec true, HTTPS vs HTTP", &https, &http));
    println!(
        "{}",
        row("exec true, new connection each", &https_new, &http_new)
    );
    d.finish(&kept).await?;
    println!(
        "api_tls_overhead_ratio_p50_new_connection={:.3}",
        https_new.p50().as_secs_f64() / http_new.p50().as_secs_f64().max(1e-9)
    );
    println!(
        "api_tls_overhead_ratio_p50={:.3}",
        https.p50().as_secs_f64() / http.p50().as_secs_f64().max(1e-9)
    );
    Ok(())
}

async fn measure(config: api::DaemonConfig, n: usize) -> anyhow::Result<()> {
    let d = super::BenchDaemon::start(config, "api", n, "operation").await?;
    let (base, key) = (d.base.clone(), d.key.clone());
    let http = reqwest::Client::new();
    let t = Instant::now();
    let agent = d.create_sandbox(&http).await?;
    println!(
        "sandbox created in {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );

    let exec_body = json!({"cmd": ["true"]});
    let post_exec = || {
        http.post(format!("{base}/sandboxes/bench/exec"))
            .bearer_auth(&key)
            .json(&exec_body)
            .send()
    };
    let true_req = proto::ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    // Warm up both paths.
    for _ in 0..10 {
        post_exec().await?.error_for_status()?;
        agent.exec(true_req.clone()).await?;
    }
    let (mut health, mut api_exec, mut agent_exec) =
        (Samples::default(), Samples::default(), Samples::default());
    let (mut api_read, mut api_write, mut agent_read, mut agent_write) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    let kib: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
    for _ in 0..n {
        let t = Instant::now();
        http.get(format!("{base}/health"))
            .send()
            .await?
            .error_for_status()?;
        health.push(t.elapsed());

        // Interleaved, so drift hits both paths alike.
        let t = Instant::now();
        let r = post_exec().await?.error_for_status()?;
        let v: serde_json::Value = r.json().await?;
        api_exec.push(t.elapsed());
        if v["exit_code"] != 0 {
            bail!("`true` failed through the API: {v}");
        }
        let t = Instant::now();
        let out = agent.exec(true_req.clone()).await?;
        agent_exec.push(t.elapsed());
        if out.exit.code != 0 {
            bail!("`true` failed through the agent");
        }

        let t = Instant::now();
        http.put(format!("{base}/sandboxes/bench/files?path=/tmp/k"))
            .bearer_auth(&key)
            .body(kib.clone())
            .send()
            .await?
            .error_for_status()?;
        api_write.push(t.elapsed());
        let t = Instant::now();
        let body = http
            .get(format!("{base}/sandboxes/bench/files?path=/tmp/k"))
            .bearer_auth(&key)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        api_read.push(t.elapsed());
        if body.len() != kib.len() {
            bail!("short read through the API");
        }
        let t = Instant::now();
        agent
            .write_file("/tmp/k2", &kib, agent_client::WriteOptions::default())
            .await?;
        agent_write.push(t.elapsed());
        let t = Instant::now();
        agent
            .read_file(proto::FileRead {
                path: "/tmp/k2".into(),
                ..Default::default()
            })
            .await?;
        agent_read.push(t.elapsed());
    }

    // Ten execs at once, through the API.
    let mut concurrent = Samples::default();
    let rounds = (n / 10).max(3);
    let mut wall = Samples::default();
    for _ in 0..rounds {
        let t0 = Instant::now();
        let calls = (0..10).map(|_| {
            let f = post_exec();
            async move {
                let t = Instant::now();
                let r = f.await?.error_for_status()?;
                let _: serde_json::Value = r.json().await?;
                anyhow::Ok(t.elapsed())
            }
        });
        for d in futures_util::future::join_all(calls).await {
            concurrent.push(d?);
        }
        wall.push(t0.elapsed());
    }

    println!("{}", header().replace("raw", "agt"));
    println!(
        "{}",
        row("exec true (API vs agent)", &api_exec, &agent_exec)
    );
    println!("{}", row("file write 1 KiB", &api_write, &agent_write));
    println!("{}", row("file read 1 KiB", &api_read, &agent_read));
    println!(
        "{}",
        row("10 concurrent execs, each", &concurrent, &agent_exec)
    );
    println!("{}", row("10 concurrent execs, all", &wall, &agent_exec));
    println!(
        "GET /health: p50 {:.3} ms, p95 {:.3} ms, p99 {:.3} ms",
        ms(health.p50()),
        ms(health.percentile(95.0)),
        ms(health.percentile(99.0))
    );

    d.finish(&http).await?;
    println!(
        "api_exec_overhead_ratio_p50={:.3}",
        api_exec.p50().as_secs_f64() / agent_exec.p50().as_secs_f64().max(1e-9)
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
