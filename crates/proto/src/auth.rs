//! Challenge-response authentication (protocol 2), both ways.
//!
//! The token never crosses the wire. On connect the agent sends a fresh
//! random [`Nonce`] in [`crate::Challenge`]; the host answers with its own
//! nonce and [`host_proof`] in [`crate::Auth`]; the agent checks it in
//! constant time and answers [`crate::AuthOk`] with [`agent_proof`], which
//! the host checks in turn. Each proof is HMAC-SHA256 keyed with the
//! sandbox token over both nonces and a context string naming the protocol
//! and the direction, so a proof is good for one connection only (a new
//! agent nonce each time) and a proof of one direction never passes for the
//! other.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;

/// Bytes of a proof (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;

/// MAC context of the host's proof.
pub const HOST_CONTEXT: &[u8] = b"bhatti agent auth v2: host to agent";

/// MAC context of the agent's proof.
pub const AGENT_CONTEXT: &[u8] = b"bhatti agent auth v2: agent to host";

/// A random value used once, sent as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce(pub [u8; NONCE_LEN]);

/// An HMAC-SHA256 tag, sent as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Proof(pub [u8; PROOF_LEN]);

/// The operating system's random source failed.
#[derive(Debug, thiserror::Error)]
#[error("the OS random source failed: {0}")]
pub struct RandomError(String);

impl Nonce {
    /// A fresh nonce from the OS random source (`getrandom(2)`).
    pub fn random() -> Result<Nonce, RandomError> {
        let mut b = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut b).map_err(|e| RandomError(e.to_string()))?;
        Ok(Nonce(b))
    }
}

fn mac(token: &[u8], first: &Nonce, second: &Nonce, context: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token).expect("HMAC accepts any key length");
    m.update(&first.0);
    m.update(&second.0);
    m.update(context);
    m
}

/// The host's proof: HMAC-SHA256(token, agent nonce ‖ host nonce ‖ [`HOST_CONTEXT`]).
pub fn host_proof(token: &[u8], agent_nonce: &Nonce, host_nonce: &Nonce) -> Proof {
    let tag = mac(token, agent_nonce, host_nonce, HOST_CONTEXT).finalize();
    Proof(tag.into_bytes().into())
}

/// The agent's proof: HMAC-SHA256(token, host nonce ‖ agent nonce ‖ [`AGENT_CONTEXT`]).
pub fn agent_proof(token: &[u8], agent_nonce: &Nonce, host_nonce: &Nonce) -> Proof {
    let tag = mac(token, host_nonce, agent_nonce, AGENT_CONTEXT).finalize();
    Proof(tag.into_bytes().into())
}

/// Whether `presented` is the host's proof for these nonces (constant time).
pub fn verify_host_proof(
    token: &[u8],
    agent_nonce: &Nonce,
    host_nonce: &Nonce,
    presented: &Proof,
) -> bool {
    mac(token, agent_nonce, host_nonce, HOST_CONTEXT)
        .verify_slice(&presented.0)
        .is_ok()
}

/// Whether `presented` is the agent's proof for these nonces (constant time).
pub fn verify_agent_proof(
    token: &[u8],
    agent_nonce: &Nonce,
    host_nonce: &Nonce,
    presented: &Proof,
) -> bool {
    mac(token, host_nonce, agent_nonce, AGENT_CONTEXT)
        .verify_slice(&presented.0)
        .is_ok()
}

fn to_hex<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(b))
}

fn from_hex<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    let mut out = [0u8; N];
    hex::decode_to_slice(s.as_bytes(), &mut out)
        .map_err(|e| serde::de::Error::custom(format!("expected {} hex digits: {e}", 2 * N)))?;
    Ok(out)
}

impl Serialize for Nonce {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        to_hex(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Nonce {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_hex(d).map(Nonce)
    }
}

impl Serialize for Proof {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        to_hex(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Proof {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_hex(d).map(Proof)
    }
}

impl std::fmt::Debug for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nonce({})", hex::encode(self.0))
    }
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proof({})", hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"0123456789abcdef0123";

    #[test]
    fn proofs_match_an_independent_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let m = {
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
            m.update(b"what do ya want for nothing?");
            hex::encode(m.finalize().into_bytes())
        };
        assert_eq!(
            m,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // The proof covers the nonces in order, then the context.
        let a = Nonce([1; NONCE_LEN]);
        let h = Nonce([2; NONCE_LEN]);
        let mut data = Vec::new();
        data.extend_from_slice(&a.0);
        data.extend_from_slice(&h.0);
        data.extend_from_slice(HOST_CONTEXT);
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(TOKEN).unwrap();
        m.update(&data);
        assert_eq!(
            host_proof(TOKEN, &a, &h).0.as_slice(),
            m.finalize().into_bytes().as_slice()
        );
    }

    #[test]
    fn a_proof_binds_token_nonces_and_direction() {
        let a = Nonce([7; NONCE_LEN]);
        let h = Nonce([9; NONCE_LEN]);
        let p = host_proof(TOKEN, &a, &h);
        assert!(verify_host_proof(TOKEN, &a, &h, &p));
        assert!(!verify_host_proof(b"another-token-0123", &a, &h, &p));
        assert!(!verify_host_proof(TOKEN, &Nonce([8; NONCE_LEN]), &h, &p));
        assert!(!verify_host_proof(TOKEN, &a, &Nonce([8; NONCE_LEN]), &p));
        // Swapped nonces or the other direction's context do not pass.
        assert!(!verify_host_proof(TOKEN, &h, &a, &p));
        assert!(!verify_agent_proof(TOKEN, &a, &h, &p));
        let q = agent_proof(TOKEN, &a, &h);
        assert!(verify_agent_proof(TOKEN, &a, &h, &q));
        assert_ne!(p, q);
        let mut flipped = p;
        flipped.0[31] ^= 1;
        assert!(!verify_host_proof(TOKEN, &a, &h, &flipped));
    }

    #[test]
    fn nonces_are_fresh_and_travel_as_hex() {
        let n1 = Nonce::random().unwrap();
        let n2 = Nonce::random().unwrap();
        assert_ne!(n1, n2);
        let json = serde_json::to_string(&n1).unwrap();
        assert_eq!(json.len(), 2 + 2 * NONCE_LEN);
        assert_eq!(serde_json::from_str::<Nonce>(&json).unwrap(), n1);
        for bad in [
            "\"\"",
            "\"abcd\"",
            &format!("\"{}\"", "zz".repeat(32)),
            "17",
        ] {
            assert!(serde_json::from_str::<Nonce>(bad).is_err(), "{bad}");
        }
        let long = format!("\"{}\"", "00".repeat(33));
        assert!(serde_json::from_str::<Proof>(&long).is_err());
    }
}
