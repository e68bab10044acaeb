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

#[cfg(test)]
mod tests {
    use super::*;

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
