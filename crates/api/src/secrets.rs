//! Secret values encrypted at rest with age (X25519). The daemon's identity
//! lives in `DATA/secrets.key` (mode 0600), created on first start.

use std::io::{Read, Write};
use std::path::Path;
use std::str::FromStr;

use age::secrecy::ExposeSecret;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read or write the secrets key {path}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the secrets key {path} is not an age identity")]
    BadKey { path: String },
    #[error("encrypting a secret failed: {0}")]
    Encrypt(String),
    #[error("decrypting a secret failed: {0}")]
    Decrypt(String),
}

/// Encrypts and decrypts secret values.
pub struct SecretBox {
    identity: age::x25519::Identity,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox { .. }")
    }
}

impl SecretBox {
    /// Loads the identity at `path`, creating it (0600) if absent.
    pub fn open(path: &Path) -> Result<SecretBox, SecretsError> {
        let shown = path.display().to_string();
        let io = |source| SecretsError::KeyFile {
            path: shown.clone(),
            source,
        };
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(io)?;
            let identity =
                age::x25519::Identity::from_str(text.trim()).map_err(|_| SecretsError::BadKey {
                    path: shown.clone(),
                })?;
            return Ok(SecretBox { identity });
        }
        let identity = age::x25519::Identity::generate();
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(identity.to_string().expose_secret().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        Ok(SecretBox { identity })
    }

    pub fn encrypt(&self, plaintext: &str) -> Result<Vec<u8>, SecretsError> {
        let recipient = self.identity.to_public();
        let encryptor =
            age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
                .map_err(|e| SecretsError::Encrypt(e.to_string()))?;
        let mut out = Vec::new();
        let mut w = encryptor
            .wrap_output(&mut out)
            .map_err(|e| SecretsError::Encrypt(e.to_string()))?;
        w.write_all(plaintext.as_bytes())
            .and_then(|()| w.finish().map(drop))
            .map_err(|e| SecretsError::Encrypt(e.to_string()))?;
        Ok(out)
    }

    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<String, SecretsError> {
        let decryptor =
            age::Decryptor::new(ciphertext).map_err(|e| SecretsError::Decrypt(e.to_string()))?;
        let mut r = decryptor
            .decrypt(std::iter::once(&self.identity as &dyn age::Identity))
            .map_err(|e| SecretsError::Decrypt(e.to_string()))?;
        let mut s = String::new();
        r.read_to_string(&mut s)
            .map_err(|e| SecretsError::Decrypt(e.to_string()))?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_persists_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let b = SecretBox::open(&path).unwrap();
        let c = b.encrypt("hunter2").unwrap();
        assert!(
            !c.windows(7).any(|w| w == b"hunter2"),
            "ciphertext must not contain the value"
        );
        assert_eq!(b.decrypt(&c).unwrap(), "hunter2");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = SecretBox::open(&path).unwrap();
        assert_eq!(again.decrypt(&c).unwrap(), "hunter2");
        assert!(again.decrypt(b"garbage").is_err());
    }
}
