//! Which Debian mirror the host's apt uses, so `mmdebstrap` goes through the
//! same one. Reads `/etc/apt/sources.list` (one-line format) and
//! `/etc/apt/sources.list.d/*.{list,sources}` (deb822) and keeps the Debian
//! archive entries for one suite family (`bookworm`, `bookworm-updates`,
//! `bookworm-security`); third-party repositories are left out.

use std::path::{Path, PathBuf};

/// Why the host's apt sources gave no usable mirror.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// A sources file could not be read.
    #[error("Cannot read {path}")]
    Io {
        /// File.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No Debian archive entry for the suite.
    #[error("No Debian archive for suite '{0}' in the host's apt sources")]
    NoDebianSource(String),
}

/// One `deb` source entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    /// Archive URI (`http://deb.debian.org/debian`).
    pub uri: String,
    /// Suite (`bookworm-security`).
    pub suite: String,
    /// Components (`main`).
    pub components: Vec<String>,
}

impl SourceEntry {
    /// The one-line form (`deb URI SUITE COMPONENTS…`) that mmdebstrap takes.
    pub fn to_line(&self) -> String {
        format!(
            "deb {} {} {}",
            self.uri,
            self.suite,
            self.components.join(" ")
        )
    }

    /// Whether the URI names a Debian archive (`…/debian`, `…/debian-security`).
    fn is_debian_archive(&self) -> bool {
        let last = self
            .uri
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("");
        matches!(last, "debian" | "debian-security")
    }
}

/// Parses one-line `sources.list` text.
pub fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace().peekable();
        if words.next() != Some("deb") {
            continue;
        }
        // Skip an options block: `[arch=amd64 signed-by=…]`.
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(SourceEntry {
            uri: uri.to_owned(),
            suite: suite.to_owned(),
            components: words.map(str::to_owned).collect(),
        });
    }
    out
}

/// Parses deb822 `.sources` text.
pub fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut types = Vec::new();
        let (mut uris, mut suites, mut comps) = (Vec::new(), Vec::new(), Vec::new());
        let mut enabled = true;
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let words = || {
                value
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            };
            match key.trim() {
                "Types" => types = words(),
                "URIs" => uris = words(),
                "Suites" => suites = words(),
                "Components" => comps = words(),
                "Enabled" => enabled = value.trim() != "no",
                _ => {}
            }
        }
        if !enabled || !types.iter().any(|t| t == "deb") {
            continue;
        }
        for uri in &uris {
            for suite in &suites {
                out.push(SourceEntry {
                    uri: uri.clone(),
                    suite: suite.clone(),
                    components: comps.clone(),
                });
            }
        }
    }
    out
}

/// The Debian archive entries among `entries` for `suite` and its
/// `-updates`/`-security` companions, in their original order.
pub fn debian_entries(entries: &[SourceEntry], suite: &str) -> Vec<SourceEntry> {
    let wanted = [
        suite.to_owned(),
        format!("{suite}-updates"),
        format!("{suite}-security"),
    ];
    let mut out: Vec<SourceEntry> = Vec::new();
    for e in entries {
        if e.is_debian_archive() && wanted.contains(&e.suite) && !out.contains(e) {
            out.push(e.clone());
        }
    }
    out
}

/// Reads the host's apt sources under `etc_apt` (normally `/etc/apt`) and
/// returns the Debian archive entries for `suite`.
pub fn host_debian_sources(etc_apt: &Path, suite: &str) -> Result<Vec<SourceEntry>, MirrorError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| MirrorError::Io {
            path: path.to_owned(),
            source,
        })
    };
    let mut entries = Vec::new();
    let main = etc_apt.join("sources.list");
    if main.exists() {
        entries.extend(parse_one_line(&read(&main)?));
    }
    let dir = etc_apt.join("sources.list.d");
    if dir.is_dir() {
        let io = |source| MirrorError::Io {
            path: dir.clone(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(io)?;
        files.sort();
        for f in files {
            match f.extension().and_then(|e| e.to_str()) {
                Some("list") => entries.extend(parse_one_line(&read(&f)?)),
                Some("sources") => entries.extend(parse_deb822(&read(&f)?)),
                _ => {}
            }
        }
    }
    let found = debian_entries(&entries, suite);
    if found.iter().any(|e| e.suite == suite) {
        Ok(found)
    } else {
        Err(MirrorError::NoDebianSource(suite.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n";

    #[test]
    fn deb822_keeps_debian_archives_only() {
        let got = debian_entries(&parse_deb822(DEB822), "bookworm");
        let lines: Vec<String> = got.iter().map(SourceEntry::to_line).collect();
        assert_eq!(
            lines,
            vec![
                "deb http://deb.debian.org/debian bookworm main",
                "deb http://deb.debian.org/debian bookworm-updates main",
                "deb http://deb.debian.org/debian-security bookworm-security main",
            ]
        );
    }

    #[test]
    fn one_line_with_options_and_comments() {
        let text = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main contrib # tail\ndeb-src http://x/debian bookworm main\ndeb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n";
        let got = debian_entries(&parse_one_line(text), "bookworm");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].uri, "http://mirror.example/debian/");
        assert_eq!(got[0].components, vec!["main", "contrib"]);
    }

    #[test]
    fn disabled_stanza_and_missing_suite() {
        let text = "Enabled: no\nTypes: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n";
        assert!(parse_deb822(text).is_empty());
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        std::fs::write(dir.path().join("sources.list.d/debian.sources"), DEB822).unwrap();
        assert_eq!(
            host_debian_sources(dir.path(), "bookworm").unwrap().len(),
            3
        );
        assert!(matches!(
            host_debian_sources(dir.path(), "trixie"),
            Err(MirrorError::NoDebianSource(_))
        ));
    }
}
