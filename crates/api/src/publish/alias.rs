//! Aliases: the public names of published ports. An alias is one DNS label
//! (it becomes `<alias>.<domain>` with host routing), so the rules are a
//! DNS label's, plus a list of names kept for the system.

/// Names no publication may take: they are (or may become) the service's
/// own hosts and paths, or names mail, DNS and browsers give meaning to.
/// Shorter names (`ns`, `mx`, …) are refused by the length rule anyway.
pub const RESERVED: &[&str] = &[
    // bhatti's own.
    "api",
    "bhatti",
    "admin",
    "administrator",
    "dashboard",
    "console",
    "health",
    "healthz",
    "status",
    "metrics",
    "static",
    "assets",
    "cdn",
    "docs",
    "help",
    "support",
    "internal",
    "system",
    "root",
    "proxy",
    "gateway",
    "publish",
    // The browser terminal's path on the public proxy (`publish --shell`).
    "share",
    // Accounts.
    "auth",
    "oauth",
    "sso",
    "login",
    "logout",
    "signin",
    "signup",
    "account",
    "accounts",
    "billing",
    "security",
    // Web, mail and name service conventions.
    "www",
    "mail",
    "email",
    "webmail",
    "smtp",
    "imap",
    "pop",
    "pop3",
    "ftp",
    "sftp",
    "ssh",
    "dns",
    "ns1",
    "ns2",
    "ns3",
    "ns4",
    "localhost",
    "autoconfig",
    "autodiscover",
    "wpad",
    "isatap",
];

/// Shortest alias.
pub const MIN_LEN: usize = 3;
/// Longest alias (a DNS label).
pub const MAX_LEN: usize = 63;

/// Why an alias is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AliasError {
    #[error("alias '{alias}' must be {MIN_LEN}-{MAX_LEN} characters long")]
    Length { alias: String },
    #[error("alias '{alias}' may use only a-z, 0-9 and '-'")]
    Characters { alias: String },
    #[error("alias '{alias}' must start and end with a letter or digit")]
    Hyphen { alias: String },
    #[error("alias '{alias}' must not have '--' at positions 3-4 (reserved for punycode)")]
    Punycode { alias: String },
    #[error("alias '{alias}' is reserved for the system")]
    Reserved { alias: String },
}

/// Checks an alias as given (lowercase expected; see [`parse`]).
pub fn validate(alias: &str) -> Result<(), AliasError> {
    let err = || alias.to_string();
    if alias.len() < MIN_LEN || alias.len() > MAX_LEN {
        return Err(AliasError::Length { alias: err() });
    }
    if !alias
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(AliasError::Characters { alias: err() });
    }
    if alias.starts_with('-') || alias.ends_with('-') {
        return Err(AliasError::Hyphen { alias: err() });
    }
    if alias.get(2..4) == Some("--") {
        return Err(AliasError::Punycode { alias: err() });
    }
    if RESERVED.contains(&alias) {
        return Err(AliasError::Reserved { alias: err() });
    }
    Ok(())
}

/// An alias from a user: DNS names ignore case, so it is lowercased, then
/// checked.
pub fn parse(input: &str) -> Result<String, AliasError> {
    let alias = input.to_ascii_lowercase();
    validate(&alias)?;
    Ok(alias)
}

/// The alias a publication gets when none is asked for:
/// `<sandbox-name>-<port>`, or `<sandbox-name>-<port>-<suffix>` when a
/// suffix is given (the plain one was taken). The name is lowercased, the
/// characters an alias cannot have become '-', runs of '-' collapse, and
/// it is shortened to fit. The answer always passes [`validate`] when
/// `suffix` is empty or lowercase alphanumeric.
pub fn default_alias(sandbox_name: &str, port: u16, suffix: &str) -> String {
    let tail = if suffix.is_empty() {
        format!("-{port}")
    } else {
        format!("-{port}-{suffix}")
    };
    let mut base = String::with_capacity(sandbox_name.len());
    for c in sandbox_name.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (base.is_empty() || base.ends_with('-'))) {
            base.push(c);
        }
    }
    base.truncate(MAX_LEN.saturating_sub(tail.len()));
    while base.ends_with('-') {
        base.pop();
    }
    // "ab--…" would read as punycode; "x" alone is too short with a port
    // only when the port is short too, so pad with a fixed word.
    if base.get(2..4) == Some("--") || base.len() < 2 {
        base = format!("pub{base}");
        base.retain(|c| c != '-');
        base.truncate(MAX_LEN.saturating_sub(tail.len()));
    }
    let alias = format!("{base}{tail}");
    match validate(&alias) {
        Ok(()) => alias,
        // Only reachable with a suffix that is not alphanumeric.
        Err(_) => format!("pub-{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn good_aliases() {
        for a in [
            "myapp",
            "my-app",
            "abc",
            "a1b",
            "123",
            "dev-3000",
            &"x".repeat(63),
        ] {
            assert_eq!(validate(a), Ok(()), "{a}");
        }
        assert_eq!(parse("MyApp").unwrap(), "myapp");
    }

    #[test]
    fn bad_aliases_say_why() {
        let kind = |e: &AliasError| match e {
            AliasError::Length { .. } => "length",
            AliasError::Characters { .. } => "characters",
            AliasError::Hyphen { .. } => "hyphen",
            AliasError::Punycode { .. } => "punycode",
            AliasError::Reserved { .. } => "reserved",
        };
        let long = "x".repeat(64);
        for (a, want) in [
            ("ab", "length"),
            ("", "length"),
            (long.as_str(), "length"),
            ("my_app", "characters"),
            ("my.app", "characters"),
            ("my app", "characters"),
            ("MyApp", "characters"),
            ("café", "characters"),
            ("-app", "hyphen"),
            ("app-", "hyphen"),
            ("xn--bcher", "punycode"),
            ("ab--c", "punycode"),
            ("api", "reserved"),
            ("www", "reserved"),
            ("localhost", "reserved"),
        ] {
            let e = validate(a).unwrap_err();
            assert_eq!(kind(&e), want, "{a}: {e}");
        }
        // Other hyphens are fine.
        assert_eq!(validate("a--b"), Ok(()));
        assert_eq!(validate("abc--d"), Ok(()));
        assert!(parse("ADMIN").unwrap_err().to_string().contains("reserved"));
    }

    #[test]
    fn every_reserved_name_is_otherwise_a_valid_label() {
        for r in RESERVED {
            assert_eq!(r.to_ascii_lowercase(), *r);
            assert!(r.len() >= MIN_LEN, "{r} is refused by length already");
            assert!(matches!(validate(r), Err(AliasError::Reserved { .. })));
        }
    }

    #[test]
    fn default_aliases() {
        assert_eq!(default_alias("dev", 3000, ""), "dev-3000");
        assert_eq!(default_alias("Dev_Box.1", 80, ""), "dev-box-1-80");
        assert_eq!(default_alias("web", 8080, "a1b2"), "web-8080-a1b2");
        assert_eq!(default_alias("x", 1, ""), "pubx-1");
        assert_eq!(default_alias("ab--cd", 1, ""), "ab-cd-1");
        assert_eq!(default_alias("---", 5, ""), "pub-5");
        let long = default_alias(&"n".repeat(63), 65535, "ffff");
        assert_eq!(long.len(), 63);
        assert!(long.ends_with("-65535-ffff"));
    }

    proptest! {
        #[test]
        fn validation_never_panics(s in "\\PC*") {
            let _ = validate(&s);
            let _ = parse(&s);
        }

        #[test]
        fn parsed_aliases_are_lowercase_dns_labels(s in "[a-zA-Z0-9-]{0,70}") {
            if let Ok(a) = parse(&s) {
                prop_assert!(a.len() >= MIN_LEN && a.len() <= MAX_LEN);
                prop_assert!(!a.starts_with('-') && !a.ends_with('-'));
                prop_assert_eq!(a, s.to_ascii_lowercase());
            }
        }

        #[test]
        fn default_aliases_are_always_valid(
            name in "\\PC{0,80}",
            port in 1u16..,
            suffix in "[a-z0-9]{0,6}",
        ) {
            let a = default_alias(&name, port, &suffix);
            prop_assert_eq!(validate(&a), Ok(()), "{}", a);
        }
    }
}
