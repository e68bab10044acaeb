//! Applying the config drive and the network identity to the new root:
//! hostname, `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`, and the
//! drive's files. Renderers are pure; writes are atomic (temp + rename), so
//! a crash never leaves half a file.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use proto::config_drive::ConfigFile;

use super::error::BootError;

/// `/etc/hosts`: loopback names, then the hostname on its own IP and on
/// 127.0.1.1 (Debian's convention, so it resolves even without network).
pub fn hosts_file(hostname: &str, ip: Ipv4Addr) -> String {
    let short = hostname.split('.').next().unwrap_or(hostname);
    let names = if short == hostname {
        hostname.to_string()
    } else {
        format!("{hostname} {short}")
    };
    format!(
        "127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         {ip}\t{names}\n\
         127.0.1.1\t{names}\n"
    )
}

/// `/etc/resolv.conf` with one name server.
pub fn resolv_conf(dns: Ipv4Addr) -> String {
    format!("nameserver {dns}\n")
}

/// The gid of the `tty` group in an `/etc/group` text.
pub fn tty_gid(group: &str) -> Option<u32> {
    group.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == "tty").then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Writes `content` to `path` atomically with `mode` and owner `uid:gid`
/// (through a temp file in the same directory; replaces a symlink at `path`
/// rather than following it).
pub fn write_atomic(
    path: &Path,
    content: &[u8],
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<(), BootError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.lohar-tmp"));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(BootError::io("create", &tmp))?;
        f.write_all(content).map_err(BootError::io("write", &tmp))?;
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
            .map_err(BootError::io("chown", &tmp))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(BootError::io("chmod", &tmp))?;
        std::fs::rename(&tmp, path).map_err(BootError::io("rename into place", path))
    })();
    if result.is_err() {
        // Best effort: the original error is what matters.
        if let Err(e) = std::fs::remove_file(&tmp) {
            tracing::debug!(path = %tmp.display(), error = %e, "removing a temp file");
        }
    }
    result
}

/// Sets the kernel hostname and writes `/etc/hostname`, `/etc/hosts` and
/// `/etc/resolv.conf`.
pub fn apply_identity(hostname: &str, ip: Ipv4Addr, dns: Ipv4Addr) -> Result<(), BootError> {
    rename(hostname, ip)?;
    write_atomic(
        Path::new("/etc/resolv.conf"),
        resolv_conf(dns).as_bytes(),
        0o644,
        0,
        0,
    )
}

/// Sets the kernel hostname and writes `/etc/hostname` and `/etc/hosts`
/// (at boot, and again when a restored guest is told its new identity).
pub fn rename(hostname: &str, ip: Ipv4Addr) -> Result<(), BootError> {
    nix::unistd::sethostname(hostname).map_err(|source| BootError::Hostname {
        hostname: hostname.to_string(),
        source,
    })?;
    std::fs::create_dir_all("/etc").map_err(BootError::io("create", "/etc"))?;
    write_atomic(
        Path::new("/etc/hostname"),
        format!("{hostname}\n").as_bytes(),
        0o644,
        0,
        0,
    )?;
    write_atomic(
        Path::new("/etc/hosts"),
        hosts_file(hostname, ip).as_bytes(),
        0o644,
        0,
        0,
    )
}

/// Writes the config drive's files. Missing parent directories are created
/// (mode 0755) owned by the file's owner, so `/home/lohar/.config/x` stays
/// the user's; existing directories are left as they are.
pub fn write_files(files: &[ConfigFile]) -> Result<(), BootError> {
    for f in files {
        let path = PathBuf::from(&f.path);
        if let Some(parent) = path.parent() {
            let missing: Vec<&Path> = parent.ancestors().take_while(|a| !a.exists()).collect();
            for dir in missing.into_iter().rev() {
                std::fs::create_dir(dir).map_err(BootError::io("create directory", dir))?;
                std::os::unix::fs::chown(dir, Some(f.owner), Some(f.owner))
                    .map_err(BootError::io("chown", dir))?;
            }
        }
        write_atomic(&path, f.content.as_bytes(), f.mode, f.owner, f.owner)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_maps_the_hostname_to_its_ip_and_127_0_1_1() {
        let h = hosts_file("sb-1", Ipv4Addr::new(10, 77, 0, 2));
        assert!(h.contains("127.0.0.1\tlocalhost\n"));
        assert!(h.contains("10.77.0.2\tsb-1\n"));
        assert!(h.contains("127.0.1.1\tsb-1\n"));
        let h = hosts_file("sb-1.example", Ipv4Addr::new(10, 0, 0, 2));
        assert!(h.contains("10.0.0.2\tsb-1.example sb-1\n"), "{h}");
        assert_eq!(
            resolv_conf(Ipv4Addr::new(10, 0, 0, 1)),
            "nameserver 10.0.0.1\n"
        );
    }

    #[test]
    fn finds_the_tty_group() {
        assert_eq!(tty_gid("root:x:0:\ntty:x:5:\nlohar:x:1000:\n"), Some(5));
        assert_eq!(tty_gid("root:x:0:\nttyx:x:7:\n"), None);
        assert_eq!(tty_gid("tty:x:notanumber:\n"), None);
    }

    #[test]
    fn writes_files_atomically_with_mode_and_parents() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let target = dir.path().join("a/b/c.txt");
        let file = ConfigFile {
            path: target.display().to_string(),
            content: "hello\n".into(),
            mode: 0o640,
            owner: me,
        };
        write_files(std::slice::from_ref(&file)).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "hello\n");
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        // A symlink in the way is replaced, not followed.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::fs::remove_file(&target).unwrap();
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_files(&[file]).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "hello\n");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a/b")).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp files left");
    }
}
