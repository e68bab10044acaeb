//! What each client command does: resolve settings, call the API, print.

use std::collections::BTreeMap;
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use api_types::{headers, limits, CreateSandbox, ExecBody, Health, NewFile, NewSecret};
use serde::Serialize;

use crate::args::{
    AdminCommand, CheckpointCommand, Command, CreateArgs, EventsArgs, ExecArgs, FileCommand,
    FileSpec, GlobalArgs, ImageClientCommand, SecretCommand, VolumeCommand, WarmArgs,
};
use crate::client::Client;
use crate::config::{self, Layer};
use crate::error::{CliError, Result};
use crate::exec::{self, Sink};
use crate::output;
use crate::shell::{self, Outcome, ShellRequest};
use crate::terminal::NoEcho;

/// Runs one client command; the answer is the process exit code.
pub fn run(global: GlobalArgs, command: Command, app: fn() -> clap::Command) -> Result<u8> {
    if let Command::Completion { shell } = command {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut app(), "bhatti", &mut out);
        print_bytes(&out)?;
        return Ok(0);
    }
    let env = |k: &str| std::env::var(k).ok();
    let path = config::config_path(env);
    // `setup` writes the file, so a broken one must not stop it.
    let file = match (&command, &path) {
        (Command::Setup, _) | (_, Err(_)) => Layer::default(),
        (_, Ok(p)) => config::load(p)?,
    };
    let flags = Layer {
        url: global.url.clone(),
        token: global.token.clone(),
        ca_file: global.ca_file.clone(),
    };
    let settings = config::resolve(&flags, &config::env_layer(env), &file);
    let client = Client::with_ca(
        &settings.url,
        settings.token.clone(),
        settings.ca_file.as_deref().map(std::path::Path::new),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let ctx = Ctx {
        client,
        json: global.json,
        config_path: path,
    };
    rt.block_on(ctx.dispatch(command))
}

struct Ctx {
    client: Client,
    json: bool,
    config_path: Result<PathBuf>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn print_bytes(b: &[u8]) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(b)
        .and_then(|()| out.flush())
        .map_err(CliError::Output)
}

fn print(s: &str) -> Result<()> {
    print_bytes(s.as_bytes())
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).expect("API values serialise");
    s.push('\n');
    print(&s)
}

/// `bhatti version --json`.
#[derive(Debug, Serialize)]
struct VersionReport {
    client: &'static str,
    url: String,
    server: Option<Health>,
    server_error: Option<String>,
}

impl Ctx {
    async fn dispatch(&self, command: Command) -> Result<u8> {
        let c = &self.client;
        match command {
            Command::Setup => self.setup().await?,
            Command::Create(a) => self.create(a).await?,
            Command::List => {
                let list = c.list().await?;
                if self.json {
                    print_json(&list)?
                } else {
                    print(&output::sandboxes_table(&list, now_ms()))?
                }
            }
            Command::Inspect { name } => {
                let sb = c.get(&name).await?;
                if self.json {
                    print_json(&sb)?
                } else {
                    print(&output::sandbox_details(&sb, now_ms()))?
                }
            }
            Command::Exec(a) => return self.exec(a).await,
            Command::Mcp => return crate::mcp::serve(c.clone()).await,
            Command::Shell(a) => {
                let req = ShellRequest {
                    sandbox: a.name,
                    session: a.session,
                    new: a.new,
                    steal: a.steal,
                };
                return shell_outcome(&req, shell::run(c, &req).await?);
            }
            Command::Ps { name } => {
                let list = c.sessions(&name).await?;
                if self.json {
                    print_json(&list)?
                } else {
                    print(&output::sessions_table(&list, now_ms()))?
                }
            }
            Command::File(f) => self.file(f).await?,
            Command::Secret(s) => self.secret(s).await?,
            Command::Volume(v) => self.volume(v).await?,
            Command::Checkpoint(c) => self.checkpoint(c).await?,
            Command::ImageWarm(w) => self.warm(w).await?,
            Command::Image(i) => self.image(i).await?,
            Command::Fork { name, count, child } => self.fork(&name, count, child).await?,
            Command::Events(a) => self.events(a).await?,
            Command::Admin(AdminCommand::Status) => {
                let st = c.admin_status().await?;
                if self.json {
                    print_json(&st)?
                } else {
                    print(&output::admin_status(&st))?
                }
            }
            Command::Stop { name } => {
                let sb = c.lifecycle(&name, "stop", false).await?;
                eprintln!("{name} is {}", sb.thermal);
            }
            Command::Start { name, force } => {
                let sb = c.lifecycle(&name, "start", force).await?;
                eprintln!("{name} is {}", sb.thermal);
            }
            Command::Edit {
                name,
                keep_hot,
                disk,
                egress,
            } => {
                let body = api_types::PatchSandbox {
                    keep_hot,
                    labels: None,
                    egress: egress.policy(),
                    disk_size_mb: disk,
                };
                let sb = c.patch(&name, &body).await?;
                if self.json {
                    print_json(&sb)?
                } else {
                    print(&output::sandbox_details(&sb, now_ms()))?
                }
            }
            Command::Ports { name } => {
                let list = c.ports(&name).await?;
                if self.json {
                    print_json(&list)?
                } else {
                    print(&output::ports_table(&list.ports))?
                }
            }
            Command::Forward(a) => {
                let req = crate::forward::ForwardRequest {
                    sandbox: a.name,
                    port: a.port,
                    local_port: a.local_port.unwrap_or(a.port),
                    bind: a.bind,
                };
                crate::forward::run(c, &req).await?;
            }
            Command::Publish(a) if a.shell => {
                let body = api_types::CreateShare {
                    ttl_secs: a.ttl,
                    read_only: a.read_only,
                    public: true,
                };
                let created = c.share(&a.name, &body).await?;
                if self.json {
                    print_json(&created)?
                } else {
                    print(&format!("{}\n", created.url))?;
                    eprintln!(
                        "published the terminal of {} ({} link {}, expires in {}); revoke with: bhatti share {} --revoke {}",
                        a.name,
                        if created.share.read_only { "read-only" } else { "read-write" },
                        created.share.id,
                        output::until(now_ms(), created.share.expires_at),
                        a.name,
                        created.share.id
                    );
                }
            }
            Command::Publish(a) => {
                // clap requires --port without --shell.
                let port = a
                    .port
                    .ok_or_else(|| CliError::Usage("publish needs --port (or --shell)".into()))?;
                let body = api_types::PublishPort {
                    port,
                    alias: a.alias,
                };
                let p = c.publish(&a.name, &body).await?;
                if self.json {
                    print_json(&p)?
                } else {
                    print(&format!("{}\n", p.url))?;
                    eprintln!("published port {} of {} as '{}'", p.port, a.name, p.alias);
                    if p.listening == Some(false) {
                        eprintln!(
                            "note: nothing listens on port {} yet; requests get a 502 until something does",
                            p.port
                        );
                    }
                }
            }
            Command::Share(a) => self.share(a).await?,
            Command::Unpublish { name, port } => {
                c.unpublish(&name, port).await?;
                eprintln!("unpublished port {port} of {name}");
            }
            Command::Destroy { name } => {
                c.destroy(&name).await?;
                eprintln!("destroyed {name}");
            }
            Command::Version => self.version().await?,
            Command::Completion { .. } => unreachable!("handled before the runtime starts"),
        }
        Ok(0)
    }

    async fn setup(&self) -> Result<()> {
        let c = &self.client;
        c.token()?;
        let url = c.base_str();
        let list = match c.list().await {
            Ok(l) => l,
            Err(CliError::Api {
                status: 401,
                message,
            }) => return Err(CliError::TokenRefused { url, message }),
            Err(e) => return Err(e),
        };
        let path = match &self.config_path {
            Ok(p) => p,
            Err(_) => return Err(CliError::NoConfigDir),
        };
        let layer = Layer {
            url: Some(url.clone()),
            token: c.token().ok().map(String::from),
            // Absolute: the file is read from wherever the CLI runs.
            ca_file: c
                .ca_file()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
                .map(|p| p.display().to_string()),
        };
        config::save(path, &layer)?;
        print(&format!(
            "saved {url} and its token to {} ({} sandbox{})\n",
            path.display(),
            list.len(),
            if list.len() == 1 { "" } else { "es" }
        ))
    }

    async fn create(&self, a: CreateArgs) -> Result<()> {
        let files = a
            .files
            .iter()
            .map(read_new_file)
            .collect::<Result<Vec<_>>>()?;
        let body = CreateSandbox {
            name: a.name,
            image: a.image,
            cpus: a.cpus,
            memory_mb: a.memory,
            disk_size_mb: a.disk,
            volumes: a.volumes,
            env: a.env.into_iter().collect(),
            secrets: a.secrets,
            files,
            keep_hot: a.keep_hot,
            labels: a.labels.into_iter().collect::<BTreeMap<_, _>>(),
            egress: a.egress.policy(),
            init: a.init,
            from: a
                .from_checkpoint
                .map(|checkpoint| api_types::CreateFrom { checkpoint }),
            boot: a.fresh.then_some(api_types::BootMode::Fresh),
        };
        let (sb, created) = self.client.create(&body).await?;
        if !created {
            eprintln!("bhatti: a sandbox named {} already exists", sb.name);
        }
        if self.json {
            print_json(&sb)
        } else {
            print(&output::sandbox_details(&sb, now_ms()))
        }
    }

    async fn exec(&self, a: ExecArgs) -> Result<u8> {
        let body = ExecBody {
            cmd: a.cmd,
            env: a.env.into_iter().collect(),
            cwd: a.cwd,
            timeout_sec: a.timeout,
            detach: false,
        };
        let resp = self.client.exec_stream(&a.name, &body).await?;
        let mut sink = Sink::new(io::stdout(), io::stderr());
        let status = exec::stream(&self.client, resp, &mut sink).await?;
        if status.timed_out {
            let limit = a.timeout.unwrap_or(limits::DEFAULT_EXEC_TIMEOUT_SEC);
            eprintln!(
                "bhatti: the command timed out after {limit}s and was killed (exit code {})",
                status.process_code()
            );
        }
        Ok(status.process_code())
    }

    async fn file(&self, f: FileCommand) -> Result<()> {
        let c = &self.client;
        match f {
            FileCommand::Read {
                name,
                path,
                offset,
                limit,
                max_bytes,
            } => {
                let mut resp = c.read_file(&name, &path, offset, limit, max_bytes).await?;
                let header = |h: &str| {
                    resp.headers()
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                        .map(String::from)
                };
                let truncated = header(headers::TRUNCATED).as_deref() == Some("true");
                let size = header(headers::FILE_SIZE);
                let mut out = io::stdout().lock();
                let mut n = 0u64;
                while let Some(chunk) = resp.chunk().await.map_err(|e| c.transport_error(e))? {
                    out.write_all(&chunk).map_err(CliError::Output)?;
                    n += chunk.len() as u64;
                }
                out.flush().map_err(CliError::Output)?;
                if truncated {
                    eprintln!(
                        "bhatti: {path}: printed {n} bytes of {}; the rest was left out (see --offset, --limit, --max-bytes)",
                        size.as_deref().unwrap_or("?")
                    );
                }
            }
            FileCommand::Write {
                name,
                path,
                local,
                mode,
            } => {
                let data = read_upload(&local)?;
                let w = c.write_file(&name, &path, mode, data).await?;
                if self.json {
                    print_json(&w)?
                } else {
                    eprintln!("wrote {} bytes to {}", w.bytes, w.path);
                }
            }
            FileCommand::Ls { name, path } => {
                let l = c.list_dir(&name, &path).await?;
                if self.json {
                    print_json(&l)?
                } else {
                    print(&output::listing_table(&l.entries, now_ms()))?;
                    if l.truncated {
                        eprintln!("bhatti: showing {} of {} entries", l.entries.len(), l.total);
                    }
                }
            }
        }
        Ok(())
    }

    async fn secret(&self, s: SecretCommand) -> Result<()> {
        let c = &self.client;
        match s {
            SecretCommand::Set { name, value } => {
                let value = if value == "-" {
                    read_secret_value(&name)?
                } else {
                    value
                };
                if value.is_empty() {
                    return Err(CliError::EmptySecret);
                }
                let s = c.set_secret(&NewSecret { name, value }).await?;
                if self.json {
                    print_json(&s)?
                } else {
                    eprintln!("secret {} saved", s.name);
                }
            }
            SecretCommand::List => {
                let list = c.secrets().await?;
                if self.json {
                    print_json(&list)?
                } else {
                    print(&output::secrets_table(&list, now_ms()))?
                }
            }
            SecretCommand::Delete { name } => {
                c.delete_secret(&name).await?;
                eprintln!("secret {name} deleted");
            }
        }
        Ok(())
    }

    async fn checkpoint(&self, v: CheckpointCommand) -> Result<()> {
        let c = &self.client;
        let shown = match v {
            CheckpointCommand::Create { sandbox, name } => {
                c.create_checkpoint(&sandbox, &api_types::CreateCheckpoint { name })
                    .await?
            }
            CheckpointCommand::Inspect { name } => c.checkpoint(&name).await?,
            CheckpointCommand::List => {
                let list = c.checkpoints().await?;
                return if self.json {
                    print_json(&list)
                } else {
                    print(&output::checkpoints_table(&list, now_ms()))
                };
            }
            CheckpointCommand::Restore {
                sandbox,
                checkpoint,
            } => {
                let sb = c
                    .restore(&sandbox, &api_types::RestoreSandbox { checkpoint })
                    .await?;
                return if self.json {
                    print_json(&sb)
                } else {
                    print(&output::sandbox_details(&sb, now_ms()))
                };
            }
            CheckpointCommand::Rm { name } => {
                c.delete_checkpoint(&name).await?;
                eprintln!("checkpoint {name} deleted");
                return Ok(());
            }
        };
        if self.json {
            print_json(&shown)
        } else {
            print(&output::checkpoint_details(&shown, now_ms()))
        }
    }

    async fn image(&self, cmd: ImageClientCommand) -> Result<()> {
        let c = &self.client;
        match cmd {
            ImageClientCommand::List => {
                let list = c.images().await?;
                if self.json {
                    print_json(&list)
                } else {
                    print(&output::images(&list))
                }
            }
            ImageClientCommand::Inspect { name } => {
                let i = c.image(&name).await?;
                if self.json {
                    print_json(&i)
                } else {
                    print(&output::image_details(&i))
                }
            }
            ImageClientCommand::Pull(a) => {
                let credentials = registry_credentials(&a)?;
                let body = api_types::PullImage {
                    reference: a.reference.clone(),
                    name: a.name.clone(),
                    insecure: a.insecure,
                    username: credentials.0,
                    password: credentials.1,
                    token: credentials.2,
                };
                let task = c.pull_image(&body).await?;
                eprintln!(
                    "pulling {} as '{}' (task {})",
                    a.reference, task.target, task.id
                );
                self.follow_task(task).await
            }
            ImageClientCommand::Import(a) => {
                let name = match a.name {
                    Some(n) => n,
                    None => a
                        .file
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.split('.').next())
                        .filter(|n| !n.is_empty())
                        .map(str::to_ascii_lowercase)
                        .ok_or_else(|| {
                            CliError::Usage(
                                "cannot name the image after the file; pass --name".into(),
                            )
                        })?,
                };
                let file = std::fs::File::open(&a.file).map_err(|source| CliError::LocalRead {
                    path: a.file.clone(),
                    source,
                })?;
                let len = file
                    .metadata()
                    .map_err(|source| CliError::LocalRead {
                        path: a.file.clone(),
                        source,
                    })?
                    .len();
                eprintln!(
                    "uploading {} ({} MiB) as '{name}'",
                    a.file.display(),
                    len >> 20
                );
                let task = c.import_image(&name, file, len).await?;
                self.follow_task(task).await
            }
            ImageClientCommand::Save { sandbox, name } => {
                let task = c.save_image(&sandbox, &name).await?;
                eprintln!(
                    "saving sandbox '{sandbox}' as image '{name}' (task {})",
                    task.id
                );
                self.follow_task(task).await
            }
            ImageClientCommand::Delete { name } => {
                c.delete_image(&name).await?;
                if !self.json {
                    eprintln!("deleted image '{name}'");
                }
                Ok(())
            }
            ImageClientCommand::Share { name, owner } => {
                let i = c.share_image(&name, owner.as_deref(), true).await?;
                self.shared(&i)
            }
            ImageClientCommand::Unshare { name, owner } => {
                let i = c.share_image(&name, owner.as_deref(), false).await?;
                self.shared(&i)
            }
        }
    }

    fn shared(&self, i: &api_types::ImageInfo) -> Result<()> {
        if self.json {
            print_json(i)
        } else {
            print(&format!(
                "image '{}' of {} is {}\n",
                i.name,
                i.owner.as_deref().unwrap_or("the server"),
                if i.shared {
                    "shared with every user"
                } else {
                    "private"
                }
            ))
        }
    }

    /// Polls a task until it ends, with a progress bar on a terminal (a
    /// line per step otherwise). A failed task is an error with its status.
    async fn follow_task(&self, mut task: api_types::Task) -> Result<()> {
        use api_types::TaskState;
        let tty = io::stderr().is_terminal() && !self.json;
        let started = std::time::Instant::now();
        let mut last_step = String::new();
        loop {
            let p = &task.progress;
            if tty {
                eprint!("\r\x1b[2K{}", output::task_bar(&task, started.elapsed()));
            } else if p.step != last_step {
                eprintln!("    {} ({} MiB)", p.step, p.bytes_done >> 20);
            }
            last_step = p.step.clone();
            match task.state {
                TaskState::Running => {}
                TaskState::Succeeded | TaskState::Failed => break,
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            task = self.client.task(&task.id).await?;
        }
        if tty {
            eprintln!();
        }
        match (task.state, &task.result, &task.failure) {
            (TaskState::Succeeded, Some(img), _) => {
                if self.json {
                    print_json(img)
                } else {
                    print(&format!(
                        "{} '{}' in {:.1}s: rootfs {} MiB{}\n",
                        match task.kind.as_str() {
                            "pull" => "pulled",
                            "import" => "imported",
                            _ => "saved",
                        },
                        img.name,
                        started.elapsed().as_secs_f64(),
                        img.size_bytes >> 20,
                        img.digest
                            .as_deref()
                            .map(|d| format!(", {d}"))
                            .unwrap_or_default()
                    ))
                }
            }
            (_, _, Some(f)) => Err(CliError::Api {
                status: f.status,
                message: f.error.clone(),
            }),
            _ => Err(CliError::Remote(format!(
                "task {} ended without a result",
                task.id
            ))),
        }
    }

    async fn warm(&self, w: WarmArgs) -> Result<()> {
        let body = api_types::WarmImage {
            cpus: w.cpus,
            memory_mb: w.memory,
        };
        eprintln!("booting {} to make your template of it…", w.image);
        let t = self.client.warm_image(&w.image, &body).await?;
        if self.json {
            print_json(&t)
        } else {
            print(&format!(
                "template of {} ready: {} CPU(s), {} MiB, {} MiB on disk; creates of this image and shape now restore from it\n",
                t.image,
                t.cpus,
                t.memory_mb,
                t.bytes >> 20
            ))
        }
    }

    async fn fork(&self, name: &str, count: u32, child: Option<String>) -> Result<()> {
        let body = api_types::ForkSandbox {
            name: child,
            count: Some(count),
        };
        let children = self.client.fork(name, &body).await?;
        if self.json {
            print_json(&children)
        } else {
            print(&output::sandboxes_table(&children, now_ms()))
        }
    }

    async fn volume(&self, v: VolumeCommand) -> Result<()> {
        let c = &self.client;
        let shown = match v {
            VolumeCommand::Create { name, size } => {
                c.create_volume(&api_types::CreateVolume {
                    name,
                    size_mb: size,
                })
                .await?
            }
            VolumeCommand::Grow { name, size } => c.grow_volume(&name, size).await?,
            VolumeCommand::Clone { source, name } => c.clone_volume(&source, &name).await?,
            VolumeCommand::Inspect { name } => c.volume(&name).await?,
            VolumeCommand::List => {
                let list = c.volumes().await?;
                if self.json {
                    print_json(&list)?
                } else {
                    print(&output::volumes_table(&list, now_ms()))?
                }
                return Ok(());
            }
            VolumeCommand::Export { name, file } => {
                return self.export_volume(&name, &file).await;
            }
            VolumeCommand::Import { name, file } => {
                let (f, len) = import_source(&file)?;
                c.import_volume(&name, f, len).await?
            }
            VolumeCommand::Rm { name } => {
                c.delete_volume(&name).await?;
                eprintln!("volume {name} deleted");
                return Ok(());
            }
        };
        if self.json {
            print_json(&shown)?
        } else {
            print(&output::volume_details(&shown, now_ms()))?
        }
        Ok(())
    }

    /// `bhatti volume export`: the tar to `file` (written beside it and
    /// renamed at the end, so a cut stream leaves no partial FILE) or to
    /// standard output.
    async fn export_volume(&self, name: &str, file: &str) -> Result<()> {
        let c = &self.client;
        let mut resp = c.export_volume(name).await?;
        let (mut out, part): (Box<dyn Write>, Option<std::path::PathBuf>) = if file == "-" {
            (Box::new(io::stdout().lock()), None)
        } else {
            let part = std::path::PathBuf::from(format!("{file}.part"));
            let f = std::fs::File::create(&part).map_err(CliError::Output)?;
            (Box::new(io::BufWriter::new(f)), Some(part))
        };
        let mut n = 0u64;
        let copied: Result<()> = async {
            while let Some(chunk) = resp.chunk().await.map_err(|e| c.transport_error(e))? {
                out.write_all(&chunk).map_err(CliError::Output)?;
                n += chunk.len() as u64;
            }
            out.flush().map_err(CliError::Output)
        }
        .await;
        drop(out);
        if let Some(part) = part {
            if copied.is_err() {
                let _ = std::fs::remove_file(&part);
            } else {
                std::fs::rename(&part, file).map_err(CliError::Output)?;
            }
        }
        copied?;
        if file != "-" {
            eprintln!("volume {name}: {n} bytes of tar written to {file}");
        }
        Ok(())
    }

    async fn events(&self, a: EventsArgs) -> Result<()> {
        let c = &self.client;
        let mut query = vec![("limit", a.limit.to_string())];
        if let Some(s) = a.sandbox {
            query.push(("sandbox", s));
        }
        if let Some(t) = a.kind {
            query.push(("type", t));
        }
        if !a.follow {
            let list = c.event_list(&query).await?;
            return if self.json {
                print_json(&list)
            } else {
                print(&output::events_table(&list))
            };
        }
        let mut resp = c.events(&query, true).await?;
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| c.transport_error(e))? {
            pending.extend_from_slice(&chunk);
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                let line = &line[..line.len() - 1];
                if line.is_empty() {
                    continue;
                }
                if self.json {
                    print_bytes(line)?;
                    print("\n")?;
                    continue;
                }
                match serde_json::from_slice::<api_types::Event>(line) {
                    Ok(e) => print(&output::event_line(&e))?,
                    Err(_) => {
                        let v: serde_json::Value =
                            serde_json::from_slice(line).map_err(|source| CliError::Decode {
                                what: "GET /events?follow=true",
                                source,
                            })?;
                        return Err(CliError::Api {
                            status: 200,
                            message: v["error"].as_str().unwrap_or("bad event line").to_string(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// `bhatti share`: make a link (printed on stdout), list, or revoke.
    async fn share(&self, a: crate::args::ShareArgs) -> Result<()> {
        let c = &self.client;
        if a.list {
            let list = c.shares(&a.name).await?;
            return if self.json {
                print_json(&list)
            } else {
                print(&output::shares_table(&list, now_ms()))
            };
        }
        if let Some(id) = a.revoke {
            let ids = match (id.is_empty(), a.all) {
                (false, false) => vec![id],
                (true, true) => c.shares(&a.name).await?.into_iter().map(|s| s.id).collect(),
                (true, false) => {
                    return Err(CliError::Usage(
                        "--revoke needs a link id (see --list) or --all".into(),
                    ))
                }
                (false, true) => {
                    return Err(CliError::Usage(
                        "--revoke takes either a link id or --all, not both".into(),
                    ))
                }
            };
            for id in &ids {
                c.revoke_share(&a.name, id).await?;
                eprintln!("revoked {id}");
            }
            if ids.is_empty() {
                eprintln!("{} has no live share links", a.name);
            }
            return Ok(());
        }
        let body = api_types::CreateShare {
            ttl_secs: a.ttl,
            read_only: a.read_only,
            public: false,
        };
        let created = c.share(&a.name, &body).await?;
        if self.json {
            return print_json(&created);
        }
        print(&format!("{}\n", c.page_url(&created.path)))?;
        eprintln!(
            "{} link {} to {}'s terminal, expires in {}; revoke with: bhatti share {} --revoke {}",
            if created.share.read_only {
                "read-only"
            } else {
                "read-write"
            },
            created.share.id,
            a.name,
            output::until(now_ms(), created.share.expires_at),
            a.name,
            created.share.id
        );
        Ok(())
    }

    async fn version(&self) -> Result<()> {
        let client = env!("CARGO_PKG_VERSION");
        let url = self.client.base_str();
        let (server, server_error) = match self.client.health().await {
            Ok(h) => (Some(h), None),
            Err(e) => (
                None,
                Some(e.to_string().lines().next().unwrap_or("").to_string()),
            ),
        };
        if self.json {
            return print_json(&VersionReport {
                client,
                url,
                server,
                server_error,
            });
        }
        let server_line = match (server, server_error) {
            (Some(h), _) => format!(
                "server: bhatti {} at {url} ({} on {}; {})",
                h.version, h.engine, h.accelerator, h.engine_reason
            ),
            (None, e) => format!("server: unreachable at {url}: {}", e.unwrap_or_default()),
        };
        print(&format!("client: bhatti {client}\n{server_line}\n"))
    }
}

/// Prints what happened to the shell and picks the exit code: the
/// session's own, or 0 after a detach.
fn shell_outcome(req: &ShellRequest, outcome: Outcome) -> Result<u8> {
    match outcome {
        Outcome::Exited(code) => Ok(u8::try_from(code).unwrap_or(255)),
        Outcome::Detached { session, reason } => {
            if let Some(r) = reason {
                eprintln!("\nbhatti: {r}");
            }
            eprintln!("\n{}", shell::reattach_hint(&req.sandbox, &session));
            Ok(0)
        }
        Outcome::Interrupted { session } => {
            eprintln!("\n{}", shell::reattach_hint(&req.sandbox, &session));
            Ok(crate::error::EXIT_FAILURE)
        }
    }
}

/// A `--file LOCAL:GUEST` as the create body carries it: UTF-8 text, with
/// the local file's permission bits.
fn read_new_file(spec: &FileSpec) -> Result<NewFile> {
    use std::os::unix::fs::PermissionsExt;
    let rerr = |source| CliError::LocalRead {
        path: spec.local.clone(),
        source,
    };
    let meta = std::fs::metadata(&spec.local).map_err(rerr)?;
    if meta.len() > limits::MAX_JSON_BODY as u64 {
        return Err(CliError::TooLarge {
            what: spec.local.display().to_string(),
            size: meta.len(),
            max: limits::MAX_JSON_BODY as u64,
        });
    }
    let bytes = std::fs::read(&spec.local).map_err(rerr)?;
    let content = String::from_utf8(bytes).map_err(|_| CliError::NotText {
        path: spec.local.clone(),
    })?;
    Ok(NewFile {
        path: spec.guest.clone(),
        content,
        mode: Some(meta.permissions().mode() & 0o7777),
    })
}

/// The body of `file write`: a local file, or standard input for `-`.
/// The tar to import and its length: FILE, or standard input spooled to
/// an unlinked temporary file (the API needs the length first).
fn import_source(local: &str) -> Result<(std::fs::File, u64)> {
    use std::io::Seek;
    use std::os::unix::fs::OpenOptionsExt;
    if local != "-" {
        let path = Path::new(local);
        let rerr = |source| CliError::LocalRead {
            path: path.to_path_buf(),
            source,
        };
        let f = std::fs::File::open(path).map_err(rerr)?;
        let len = f.metadata().map_err(rerr)?.len();
        return Ok((f, len));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = std::env::temp_dir().join(format!(".bhatti-import-{}-{nanos}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(CliError::Stdin)?;
    let _ = std::fs::remove_file(&tmp);
    let len = io::copy(&mut io::stdin().lock(), &mut f).map_err(CliError::Stdin)?;
    f.rewind().map_err(CliError::Stdin)?;
    Ok((f, len))
}

fn read_upload(local: &str) -> Result<Vec<u8>> {
    let max = limits::MAX_FILE_BODY;
    let too_large = |what: &str, size| CliError::TooLarge {
        what: what.to_string(),
        size,
        max,
    };
    let mut data = Vec::new();
    if local == "-" {
        io::stdin()
            .lock()
            .take(max + 1)
            .read_to_end(&mut data)
            .map_err(CliError::Stdin)?;
        if data.len() as u64 > max {
            return Err(too_large("standard input", data.len() as u64));
        }
    } else {
        let path = Path::new(local);
        let rerr = |source| CliError::LocalRead {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(rerr)?.len();
        if len > max {
            return Err(too_large(local, len));
        }
        data = std::fs::read(path).map_err(rerr)?;
    }
    Ok(data)
}

/// A value typed at a terminal (echo off) or piped in, less the one
/// line ending that ends it.
fn read_secret_value(name: &str) -> Result<String> {
    let stdin = io::stdin();
    let mut s = String::new();
    if stdin.is_terminal() {
        eprint!("value for secret {name} (not echoed): ");
        let guard = NoEcho::enter()?;
        let read = stdin.lock().read_line(&mut s);
        drop(guard);
        eprintln!();
        read.map_err(CliError::Stdin)?;
    } else {
        stdin
            .lock()
            .read_to_string(&mut s)
            .map_err(CliError::Stdin)?;
    }
    Ok(strip_line_end(&s).to_string())
}

/// Drops one trailing `\n` or `\r\n` (as `echo` adds), nothing more.
pub fn strip_line_end(s: &str) -> &str {
    s.strip_suffix("\r\n")
        .or_else(|| s.strip_suffix('\n'))
        .unwrap_or(s)
}

/// The registry credentials of a pull: (username, password, token), from
/// the environment or stdin, never the command line.
fn registry_credentials(
    a: &crate::args::ImagePullArgs,
) -> Result<(Option<String>, Option<String>, Option<String>)> {
    match (&a.username, a.token_env) {
        (Some(user), _) => {
            let password = if a.password_stdin {
                let mut line = String::new();
                io::stdin().read_line(&mut line).map_err(CliError::Stdin)?;
                line.trim_end_matches(['\n', '\r']).to_owned()
            } else {
                std::env::var("BHATTI_REGISTRY_PASSWORD").map_err(|_| {
                    CliError::Usage(
                        "--username needs a password: $BHATTI_REGISTRY_PASSWORD or --password-stdin"
                            .into(),
                    )
                })?
            };
            Ok((Some(user.clone()), Some(password), None))
        }
        (None, true) => Ok((
            None,
            None,
            Some(std::env::var("BHATTI_REGISTRY_TOKEN").map_err(|_| {
                CliError::Usage("--token-env: $BHATTI_REGISTRY_TOKEN is not set".into())
            })?),
        )),
        (None, false) => Ok((None, None, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_end_is_stripped() {
        assert_eq!(strip_line_end("s3cret\n"), "s3cret");
        assert_eq!(strip_line_end("s3cret\r\n"), "s3cret");
        assert_eq!(strip_line_end("two\n\n"), "two\n");
        assert_eq!(strip_line_end(" keep "), " keep ");
    }

    #[test]
    fn new_files_carry_text_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.sh");
        std::fs::write(&p, "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o750)).unwrap();
        let spec = FileSpec {
            local: p.clone(),
            guest: "/workspace/run.sh".into(),
        };
        let f = read_new_file(&spec).unwrap();
        assert_eq!(f.path, "/workspace/run.sh");
        assert_eq!(f.content, "#!/bin/sh\necho hi\n");
        assert_eq!(f.mode, Some(0o750));

        std::fs::write(&p, [0xff, 0xfe, 0]).unwrap();
        let e = read_new_file(&spec).unwrap_err();
        assert!(e.to_string().contains("bhatti file write"), "{e}");
        assert_eq!(e.exit_code(), 2);
        let missing = FileSpec {
            local: dir.path().join("nope"),
            guest: "/x".into(),
        };
        assert!(matches!(
            read_new_file(&missing),
            Err(CliError::LocalRead { .. })
        ));
    }

    #[test]
    fn uploads_read_local_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        std::fs::write(&p, [0u8, 1, 2, 255]).unwrap();
        assert_eq!(
            read_upload(p.to_str().unwrap()).unwrap(),
            vec![0u8, 1, 2, 255]
        );
        let e = read_upload(dir.path().join("nope").to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
