//! API keys: `bht_` + 32 random bytes (hex). Only their SHA-256 is stored.

use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "bht_";

/// A fresh key, shown to its user once.
pub fn generate_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(format!("{KEY_PREFIX}{}", hex::encode(bytes)))
}

/// What the store keeps of a key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Random hex of `n` bytes (ids, agent tokens).
pub fn random_hex(n: usize) -> Result<String, getrandom::Error> {
    let mut bytes = vec![0u8; n];
    getrandom::getrandom(&mut bytes)?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_random_and_hashed() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), 4 + 64);
        assert_ne!(a, b);
        assert_eq!(hash_key(&a), hash_key(&a));
        assert_ne!(hash_key(&a), hash_key(&b));
        assert_eq!(hash_key(&a).len(), 64);
    }
}
