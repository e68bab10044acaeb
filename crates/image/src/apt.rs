//! Fetching Debian packages with the host's apt: resolving a package to its
//! candidate version, `apt-get download` into a directory, `dpkg-deb -x`.
//! apt is the only download path of this crate; it uses the host's configured
//! sources (see [`crate::mirror`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::{run, CommandError};

/// Why an apt/dpkg step failed.
#[derive(Debug, thiserror::Error)]
pub enum AptError {
    /// The apt or dpkg tool failed.
    #[error("Package tool failed")]
    Command(#[from] CommandError),
    /// `apt-cache show` returned no usable stanza.
    #[error("Package '{0}' has no installable candidate (run `apt-get update`?)")]
    NoCandidate(String),
    /// A meta-package does not depend on what we expected.
    #[error("Package '{package}' has no dependency starting with '{prefix}'")]
    NoDependency {
        /// The meta-package.
        package: String,
        /// The dependency prefix looked for.
        prefix: String,
    },
    /// `apt-get download` left no `.deb` behind.
    #[error("No .deb for '{0}' after apt-get download")]
    MissingDeb(String),
    /// Listing the download directory failed.
    #[error("Cannot list {path}")]
    Io {
        /// Directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A package at one version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageRef {
    /// Package name.
    pub name: String,
    /// Debian version (may carry an epoch, `1:1.35.0-4`).
    pub version: String,
    /// The Debian architecture, when it is not the host's (`arm64`): apt
    /// then fetches `name:arch` from the foreign architecture added with
    /// `dpkg --add-architecture`. `None`: the host's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
}

/// `name`, or `name:arch` for a foreign architecture.
fn qualified(name: &str, arch: Option<&str>) -> String {
    match arch {
        Some(a) => format!("{name}:{a}"),
        None => name.to_owned(),
    }
}

impl std::fmt::Display for PackageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}={}",
            qualified(&self.name, self.arch.as_deref()),
            self.version
        )
    }
}

/// The fields of one `apt-cache show` stanza that we use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stanza {
    /// `Package:`.
    pub package: String,
    /// `Version:`.
    pub version: String,
    /// Names from `Depends:` (alternatives and version constraints dropped).
    pub depends: Vec<String>,
}

/// Parses the first stanza of `apt-cache show` output.
pub fn parse_stanza(text: &str) -> Option<Stanza> {
    let mut s = Stanza::default();
    for line in text.lines() {
        if line.trim().is_empty() {
            break;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Package" => s.package = value.to_owned(),
            "Version" => s.version = value.to_owned(),
            "Depends" => {
                s.depends = value
                    .split(',')
                    .filter_map(|d| d.split('|').next())
                    .filter_map(|d| d.split_whitespace().next())
                    .map(|d| d.split(':').next().unwrap_or(d).to_owned())
                    .collect()
            }
            _ => {}
        }
    }
    (!s.package.is_empty() && !s.version.is_empty()).then_some(s)
}

/// Package operations through the host's apt and dpkg, for the host's
/// architecture or (with [`Apt::foreign`]) another one that
/// `dpkg --add-architecture` added.
#[derive(Debug, Clone, Default)]
pub struct Apt {
    arch: Option<String>,
}

impl Apt {
    /// Packages of the host's architecture.
    pub fn host() -> Self {
        Apt { arch: None }
    }

    /// Packages of the foreign Debian architecture `arch` (`arm64`).
    pub fn foreign(arch: &str) -> Self {
        Apt {
            arch: Some(arch.to_owned()),
        }
    }

    /// The candidate version of `name` (`apt-cache show --no-all-versions`).
    pub fn show(&self, name: &str) -> Result<Stanza, AptError> {
        let out = run(Command::new("apt-cache").args([
            "show",
            "--no-all-versions",
            &qualified(name, self.arch.as_deref()),
        ]))?;
        parse_stanza(&String::from_utf8_lossy(&out))
            .ok_or_else(|| AptError::NoCandidate(name.to_owned()))
    }

    /// Resolves a meta-package (`linux-image-cloud-amd64`) to the concrete
    /// package it depends on whose name starts with `prefix`.
    pub fn resolve_meta(&self, meta: &str, prefix: &str) -> Result<PackageRef, AptError> {
        let stanza = self.show(meta)?;
        let dep = stanza
            .depends
            .iter()
            .find(|d| d.starts_with(prefix))
            .ok_or_else(|| AptError::NoDependency {
                package: meta.to_owned(),
                prefix: prefix.to_owned(),
            })?;
        self.candidate(dep)
    }

    /// The candidate of a concrete package.
    pub fn candidate(&self, name: &str) -> Result<PackageRef, AptError> {
        let s = self.show(name)?;
        Ok(PackageRef {
            name: s.package,
            version: s.version,
            arch: self.arch.clone(),
        })
    }

    /// Downloads exactly `pkg` into `dir` and returns the `.deb`'s path.
    pub fn download(&self, pkg: &PackageRef, dir: &Path) -> Result<PathBuf, AptError> {
        run(Command::new("apt-get")
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(pkg.to_string())
            .current_dir(dir))?;
        let io = |source| AptError::Io {
            path: dir.to_owned(),
            source,
        };
        let prefix = format!("{}_", pkg.name);
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let name = entry
                .map_err(io)?
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name.starts_with(&prefix) && name.ends_with(".deb") {
                return Ok(dir.join(name));
            }
        }
        Err(AptError::MissingDeb(pkg.name.clone()))
    }

    /// Unpacks a `.deb`'s files into `dest` (no maintainer scripts run).
    pub fn extract(&self, deb: &Path, dest: &Path) -> Result<(), AptError> {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_meta_stanza() {
        let text = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n\nPackage: other\nVersion: 1\n";
        let s = parse_stanza(text).unwrap();
        assert_eq!(s.package, "linux-image-cloud-amd64");
        assert_eq!(s.version, "6.1.192-2");
        assert_eq!(s.depends, vec!["linux-image-6.1.0-56-cloud-amd64"]);
    }

    #[test]
    fn depends_alternatives_and_arch_qualifiers() {
        let s =
            parse_stanza("Package: p\nVersion: 1:2.0\nDepends: a (>= 1) | b, c:any, d\n").unwrap();
        assert_eq!(s.depends, vec!["a", "c", "d"]);
        assert_eq!(s.version, "1:2.0");
        assert_eq!(parse_stanza("N: Unable to locate package x\n"), None);
    }

    #[test]
    fn package_ref_display_is_apt_syntax() {
        let mut p = PackageRef {
            name: "busybox-static".into(),
            version: "1:1.35.0-4".into(),
            arch: None,
        };
        assert_eq!(p.to_string(), "busybox-static=1:1.35.0-4");
        // A manifest written before architectures existed still reads.
        let old: PackageRef =
            serde_json::from_str(r#"{"name":"busybox-static","version":"1:1.35.0-4"}"#).unwrap();
        assert_eq!(old, p);
        assert!(!serde_json::to_string(&p).unwrap().contains("arch"));
        p.arch = Some("arm64".into());
        assert_eq!(p.to_string(), "busybox-static:arm64=1:1.35.0-4");
    }
}
