//! Identifiers and secrets: [`SandboxId`] and the agent [`Token`].

use std::fmt;
use std::io::Read;

use serde::{Deserialize, Serialize};

/// Reads `n` bytes from the kernel's CSPRNG and hex-encodes them.
pub(crate) fn random_hex(n: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A sandbox's identifier: `sb-` and 12 lowercase hex digits (48 random
/// bits). Also the name of its directory under `DATA/sandboxes/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

/// A string that is not a [`SandboxId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a sandbox id (sb- and 12 hex digits)")]
pub struct BadSandboxId(pub String);

impl SandboxId {
    /// A fresh random id.
    pub fn generate() -> std::io::Result<SandboxId> {
        Ok(SandboxId(format!("sb-{}", random_hex(6)?)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SandboxId {
    type Err = BadSandboxId;
    fn from_str(s: &str) -> Result<Self, BadSandboxId> {
        let ok = s.strip_prefix("sb-").is_some_and(|hex| {
            hex.len() == 12 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if ok {
            Ok(SandboxId(s.to_owned()))
        } else {
            Err(BadSandboxId(s.to_owned()))
        }
    }
}

impl TryFrom<String> for SandboxId {
    type Error = BadSandboxId;
    fn try_from(s: String) -> Result<Self, BadSandboxId> {
        s.parse()
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> String {
        id.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The per-sandbox agent secret: 16 random bytes, hex-encoded (32
/// characters). Never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// A fresh random token.
    pub fn generate() -> std::io::Result<Token> {
        random_hex(16).map(Token)
    }

    /// The secret itself (for the config drive and the agent client).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_and_parse_back() {
        let a = SandboxId::generate().unwrap();
        let b = SandboxId::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 15);
        assert_eq!(a.as_str().parse::<SandboxId>().unwrap(), a);
        assert!(image::disk::valid_sandbox_id(a.as_str()));
        for bad in [
            "",
            "sb-",
            "sb-12345678901",
            "sb-1234567890123",
            "sb-ABCDEF123456",
            "xx-123456789012",
            "sb-../../etc",
        ] {
            assert!(bad.parse::<SandboxId>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<SandboxId>(&json).unwrap(), a);
        assert!(serde_json::from_str::<SandboxId>("\"sb-zz\"").is_err());
    }

    #[test]
    fn tokens_are_long_random_and_redacted() {
        let t = Token::generate().unwrap();
        assert_eq!(t.expose().len(), 32);
        assert!(t.expose().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(t, Token::generate().unwrap());
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }
}
