//! Validation at the edge: names, paths, sizes.

use crate::error::ApiError;

/// An egress policy as a user wrote it, checked and parsed (entries
/// normalised: lower-case names, no duplicates).
pub fn egress(e: &api_types::Egress) -> Result<net::Egress, ApiError> {
    match e {
        api_types::Egress::Public => Ok(net::Egress::Public),
        api_types::Egress::None => Ok(net::Egress::None),
        api_types::Egress::Allow(list) => {
            net::Egress::allow(list).map_err(|e| ApiError::BadRequest(format!("egress: {e}")))
        }
    }
}

/// How the API shows a policy.
pub fn egress_view(e: &net::Egress) -> api_types::Egress {
    match e {
        net::Egress::Public => api_types::Egress::Public,
        net::Egress::None => api_types::Egress::None,
        net::Egress::Allow(list) => {
            api_types::Egress::Allow(list.iter().map(ToString::to_string).collect())
        }
    }
}

/// Sandbox and secret names: 1–63 of `a-z A-Z 0-9 - _ .`, starting alphanumeric.
pub fn name(kind: &str, s: &str) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid {kind} name '{s}': use 1-63 of letters, digits, '-', '_', '.', starting with a letter or digit"
        )))
    }
}

/// Secret names become environment variables: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn env_name(s: &str) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid name '{s}': use letters, digits and '_', not starting with a digit"
        )))
    }
}

/// A guest path: absolute, no NUL, no `..` component.
pub fn guest_path(p: &str) -> Result<(), ApiError> {
    if p.is_empty() {
        return Err(ApiError::BadRequest("path is required".into()));
    }
    if !p.starts_with('/') {
        return Err(ApiError::BadRequest(format!("path must be absolute: {p}")));
    }
    if p.contains('\0') {
        return Err(ApiError::BadRequest("path contains a NUL byte".into()));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(ApiError::BadRequest(format!(
            "path may not contain '..': {p}"
        )));
    }
    Ok(())
}

/// Most bytes of a create's `init` command.
pub const MAX_INIT_BYTES: usize = 8192;
/// The shell that runs a create's `init` command.
pub const INIT_SHELL: &str = "/bin/sh";

/// A create's `init`: the boot command `/bin/sh -c <init>` (1 to
/// [`MAX_INIT_BYTES`] bytes, not only white space, no NUL).
pub fn init(s: &str) -> Result<proto::config_drive::InitCommand, ApiError> {
    if s.trim().is_empty() {
        return Err(ApiError::BadRequest("init must not be empty".into()));
    }
    if s.len() > MAX_INIT_BYTES {
        return Err(ApiError::BadRequest(format!(
            "init is {} bytes; at most {MAX_INIT_BYTES} are allowed",
            s.len()
        )));
    }
    if s.contains('\0') {
        return Err(ApiError::BadRequest("init contains a NUL byte".into()));
    }
    Ok(proto::config_drive::InitCommand {
        argv: vec![INIT_SHELL.into(), "-c".into(), s.into()],
        cwd: None,
        user: None,
    })
}

/// How the API shows a boot command: the script given on create (any
/// other argv joined by spaces).
pub fn init_view(cmd: &proto::config_drive::InitCommand) -> String {
    match cmd.argv.as_slice() {
        [sh, c, script] if sh == INIT_SHELL && c == "-c" => script.clone(),
        argv => argv.join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_commands() {
        let cmd = init("dockerd >/dev/null 2>&1").unwrap();
        assert_eq!(cmd.argv, ["/bin/sh", "-c", "dockerd >/dev/null 2>&1"]);
        assert_eq!(cmd.cwd, None);
        assert_eq!(init_view(&cmd), "dockerd >/dev/null 2>&1");
        assert!(init(&"x".repeat(MAX_INIT_BYTES)).is_ok());
        for (bad, why) in [
            ("", "must not be empty"),
            (" \n\t", "must not be empty"),
            ("a\0b", "NUL"),
            (&"x".repeat(MAX_INIT_BYTES + 1), "at most 8192"),
        ] {
            match init(bad) {
                Err(ApiError::BadRequest(m)) => assert!(m.contains(why), "{m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let other = proto::config_drive::InitCommand {
            argv: vec!["sleep".into(), "9".into()],
            cwd: None,
            user: None,
        };
        assert_eq!(init_view(&other), "sleep 9");
    }

    #[test]
    fn names() {
        assert!(name("sandbox", "dev-1.a_b").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(64), "ü"] {
            assert!(name("sandbox", bad).is_err(), "{bad:?}");
        }
        assert!(env_name("API_KEY").is_ok());
        for bad in ["1A", "A-B", "", "A B"] {
            assert!(env_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths() {
        assert!(guest_path("/workspace/a.txt").is_ok());
        assert!(guest_path("/a..b").is_ok());
        for bad in ["", "rel/x", "/a/../etc/passwd", "/..", "/a\0b"] {
            assert!(guest_path(bad).is_err(), "{bad:?}");
        }
    }
}
