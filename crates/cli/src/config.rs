//! Where the client finds its server URL and API token: flags, then the
//! environment (`BHATTI_URL`, `BHATTI_TOKEN`), then the config file that
//! `bhatti setup` writes (`$XDG_CONFIG_HOME/bhatti/config.toml`, else
//! `~/.config/bhatti/config.toml`, mode 0600), then the default URL.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{CliError, Result};

/// The daemon's default listen address.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8700";
pub const ENV_URL: &str = "BHATTI_URL";
pub const ENV_TOKEN: &str = "BHATTI_TOKEN";
pub const ENV_CA_FILE: &str = "BHATTI_CA_FILE";

/// One source of settings; also the config file's format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A PEM file of CA certificates trusted for `https://` servers, on
    /// top of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// The settings a command runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub url: String,
    pub token: Option<String>,
    pub ca_file: Option<String>,
}

/// Merges the layers, first that has a value wins: flags, env, file.
pub fn resolve(flags: &Layer, env: &Layer, file: &Layer) -> Settings {
    let pick = |f: fn(&Layer) -> &Option<String>| {
        [flags, env, file]
            .into_iter()
            .find_map(|l| f(l).as_ref().filter(|v| !v.is_empty()).cloned())
    };
    Settings {
        url: pick(|l| &l.url).unwrap_or_else(|| DEFAULT_URL.to_string()),
        token: pick(|l| &l.token),
        ca_file: pick(|l| &l.ca_file),
    }
}

/// The environment's layer; an empty variable counts as unset.
pub fn env_layer(get: impl Fn(&str) -> Option<String>) -> Layer {
    let var = |k| get(k).filter(|v| !v.is_empty());
    Layer {
        url: var(ENV_URL),
        token: var(ENV_TOKEN),
        ca_file: var(ENV_CA_FILE),
    }
}

/// `$XDG_CONFIG_HOME/bhatti/config.toml` (when set and absolute), else
/// `$HOME/.config/bhatti/config.toml`.
pub fn config_path(get: impl Fn(&str) -> Option<String>) -> Result<PathBuf> {
    let base = match get("XDG_CONFIG_HOME").filter(|v| Path::new(v).is_absolute()) {
        Some(xdg) => PathBuf::from(xdg),
        None => match get("HOME").filter(|v| !v.is_empty()) {
            Some(home) => Path::new(&home).join(".config"),
            None => return Err(CliError::NoConfigDir),
        },
    };
    Ok(base.join("bhatti").join("config.toml"))
}

/// Reads the config file; a missing file is an empty layer.
pub fn load(path: &Path) -> Result<Layer> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Layer::default()),
        Err(source) => {
            return Err(CliError::ConfigRead {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    toml::from_str(&text).map_err(|source| CliError::ConfigParse {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes the config file atomically with mode 0600 (its directory 0700):
/// it holds an API key.
pub fn save(path: &Path, layer: &Layer) -> Result<()> {
    let werr = |source| CliError::ConfigWrite {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().expect("config path has a parent");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(werr)?;
    let text = toml::to_string(layer).expect("a config layer serialises");
    let tmp = dir.join(".config.toml.tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(werr)?;
    // The temp file may predate us with a wider mode.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(werr)?;
    f.write_all(text.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    fs::rename(&tmp, path).map_err(werr)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn layer(url: Option<&str>, token: Option<&str>) -> Layer {
        Layer {
            url: url.map(Into::into),
            token: token.map(Into::into),
            ca_file: None,
        }
    }

    #[test]
    fn flags_beat_env_beat_file_beat_default() {
        let flags = layer(Some("http://flag:1"), Some("bht_flag"));
        let env = layer(Some("http://env:2"), Some("bht_env"));
        let file = layer(Some("http://file:3"), Some("bht_file"));
        let none = Layer::default();

        let s = resolve(&flags, &env, &file);
        assert_eq!(
            (s.url.as_str(), s.token.as_deref()),
            ("http://flag:1", Some("bht_flag"))
        );
        let s = resolve(&none, &env, &file);
        assert_eq!(
            (s.url.as_str(), s.token.as_deref()),
            ("http://env:2", Some("bht_env"))
        );
        let s = resolve(&none, &none, &file);
        assert_eq!(
            (s.url.as_str(), s.token.as_deref()),
            ("http://file:3", Some("bht_file"))
        );
        let s = resolve(&none, &none, &none);
        assert_eq!((s.url.as_str(), s.token), (DEFAULT_URL, None));
    }

    #[test]
    fn url_and_token_resolve_independently() {
        let flags = layer(None, Some("bht_flag"));
        let env = layer(Some("http://env:2"), None);
        let file = layer(Some("http://file:3"), Some("bht_file"));
        let s = resolve(&flags, &env, &file);
        assert_eq!(s.url, "http://env:2");
        assert_eq!(s.token.as_deref(), Some("bht_flag"));
    }

    #[test]
    fn empty_values_count_as_unset() {
        let vars: HashMap<&str, &str> = [(ENV_URL, ""), (ENV_TOKEN, "bht_x")].into();
        let env = env_layer(|k| vars.get(k).map(|v| v.to_string()));
        assert_eq!(env, layer(None, Some("bht_x")));
        let s = resolve(
            &layer(Some(""), None),
            &env,
            &layer(Some("http://file:3"), None),
        );
        assert_eq!(s.url, "http://file:3");
    }

    #[test]
    fn config_path_prefers_absolute_xdg() {
        let get = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            config_path(get(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/x/bhatti/config.toml")
        );
        // A relative XDG_CONFIG_HOME is invalid per the spec and ignored.
        assert_eq!(
            config_path(get(&[("XDG_CONFIG_HOME", "rel"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/h/.config/bhatti/config.toml")
        );
        assert!(matches!(config_path(get(&[])), Err(CliError::NoConfigDir)));
    }

    #[test]
    fn save_then_load_round_trips_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cfg/bhatti/config.toml");
        assert_eq!(load(&path).unwrap(), Layer::default());
        let l = layer(Some("http://h:1"), Some("bht_secret"));
        save(&path, &l).unwrap();
        assert_eq!(load(&path).unwrap(), l);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        // Overwriting keeps the mode and replaces the content.
        save(&path, &layer(Some("http://h:2"), None)).unwrap();
        assert_eq!(load(&path).unwrap(), layer(Some("http://h:2"), None));
    }

    #[test]
    fn unknown_keys_in_the_file_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        fs::write(&path, "url = \"http://h\"\ntokn = \"x\"\n").unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, CliError::ConfigParse { .. }), "{e}");
        assert!(e.to_string().contains("tokn"), "{e}");
    }
}
