//! `bhatti user …`: administration straight on the daemon's database.

use std::path::PathBuf;

use anyhow::Context;

#[derive(Debug, clap::Subcommand)]
pub enum UserCommand {
    /// Create a user and print their API key (shown once).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 10)]
        max_sandboxes: u32,
        #[arg(long, default_value_t = 16)]
        max_cpus: u32,
        /// MiB in all of the user's sandboxes.
        #[arg(long, default_value_t = 16384)]
        max_memory: u64,
        /// MiB of disk in all of the user's sandboxes.
        #[arg(long, default_value_t = 51200)]
        max_disk: u64,
        /// Print only the key, alone on its line.
        #[arg(long)]
        quiet: bool,
        #[arg(long, default_value = "/var/lib/bhatti")]
        data_dir: PathBuf,
    },
    /// List users and their quotas.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/var/lib/bhatti")]
        data_dir: PathBuf,
    },
    /// Delete a user (their sandboxes must be destroyed first).
    Delete {
        name: String,
        #[arg(long, default_value = "/var/lib/bhatti")]
        data_dir: PathBuf,
    },
    /// Replace a user's key; the old one stops working.
    RotateKey {
        name: String,
        #[arg(long)]
        quiet: bool,
        #[arg(long, default_value = "/var/lib/bhatti")]
        data_dir: PathBuf,
    },
}

fn open(data_dir: &std::path::Path) -> anyhow::Result<store::Store> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    Ok(store::Store::open(&data_dir.join("bhatti.db"))?)
}

pub fn run(cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Create {
            name,
            max_sandboxes,
            max_cpus,
            max_memory,
            max_disk,
            quiet,
            data_dir,
        } => {
            let store = open(&data_dir)?;
            let quotas = api::users::Quotas {
                max_sandboxes,
                max_cpus,
                max_memory_mb: max_memory,
                max_disk_mb: max_disk,
            };
            let (user, key) = api::users::create_user(&store, &name, quotas)?;
            if quiet {
                println!("{key}");
            } else {
                println!(
                    "created user {} (max {} sandboxes, {} CPUs, {} MiB memory, {} MiB disk)\n\nAPI key (shown once, keep it safe):\n{key}",
                    user.name, user.max_sandboxes, user.max_cpus, user.max_memory_mb, user.max_disk_mb
                );
            }
        }
        UserCommand::List { json, data_dir } => {
            let users = open(&data_dir)?.users()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&users)?);
            } else {
                println!(
                    "{:<20} {:>9} {:>5} {:>10} {:>10}",
                    "NAME", "SANDBOXES", "CPUS", "MEMORY_MB", "DISK_MB"
                );
                for u in users {
                    println!(
                        "{:<20} {:>9} {:>5} {:>10} {:>10}",
                        u.name, u.max_sandboxes, u.max_cpus, u.max_memory_mb, u.max_disk_mb
                    );
                }
            }
        }
        UserCommand::Delete { name, data_dir } => {
            let store = open(&data_dir)?;
            let user = store
                .user_by_name(&name)?
                .with_context(|| format!("no user named '{name}'"))?;
            let held = store.sandboxes_of(&user.id)?;
            if !held.is_empty() {
                anyhow::bail!(
                    "user '{name}' still has {} sandbox(es); destroy them first",
                    held.len()
                );
            }
            // Their files are under DATA/volumes: deleted through the API.
            let volumes = store.volumes_of(&user.id)?;
            if !volumes.is_empty() {
                anyhow::bail!(
                    "user '{name}' still has {} volume(s); delete them first (bhatti volume rm)",
                    volumes.len()
                );
            }
            store.delete_user(&name)?;
            println!("deleted user {name}");
        }
        UserCommand::RotateKey {
            name,
            quiet,
            data_dir,
        } => {
            let key = api::users::rotate_key(&open(&data_dir)?, &name)?;
            if quiet {
                println!("{key}");
            } else {
                println!("new API key for {name} (the old one no longer works):\n{key}");
            }
        }
    }
    Ok(())
}
