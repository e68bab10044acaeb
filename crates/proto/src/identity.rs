//! A new identity for a guest restored from someone else's memory.
//!
//! A fork child, a sandbox made from a checkpoint and one made from a
//! template all start as a copy of another guest: its IP, MAC, hostname,
//! agent token, random state and clock. Before the new sandbox can be
//! reached on its own address, the host tells the restored agent who it is
//! now, over the one channel that needs no network: the guest's first
//! serial port. The host writes one line to the VMM's console input,
//!
//! ```text
//! BHATTI-IDENTITY2 <the JSON of GuestIdentity, on one line>\n
//! ```
//!
//! and the agent, which keeps the console open for reading from boot on,
//! applies it: token first (new connections must prove the new one), then
//! hostname, MAC and address, clock and entropy. The host then waits for
//! the agent to answer at the new address with the new token; that answer
//! is the acknowledgement. The JSON is compact and plain printable ASCII
//! (every field is checked to be), so no terminal line discipline acts on
//! it; it is kept short because a serial port delivers it a FIFO at a time
//! (about 330 bytes).
//!
//! Only the host writes the VMM's console input; inside the guest the
//! serial device is root's (a process that could inject a line could
//! already do anything the line does).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// What starts an identity line.
pub const IDENTITY_PREFIX: &str = "BHATTI-IDENTITY2 ";
/// The longest identity line a reader accepts (bytes, newline excluded).
pub const MAX_IDENTITY_LINE: usize = 8 * 1024;
/// Bytes of fresh entropy the host sends.
pub const IDENTITY_ENTROPY_BYTES: usize = 64;

/// Who a restored guest is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestIdentity {
    /// The new agent token (the config drive's rules: 16..=256 printable
    /// ASCII bytes).
    pub token: String,
    /// The guest's new hostname (RFC 1123).
    pub hostname: String,
    /// The new address of `eth0`.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// The new MAC of `eth0`, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Wall-clock time when the host sent it, milliseconds since the epoch.
    pub unix_ms: u64,
    /// Hex of [`IDENTITY_ENTROPY_BYTES`] random bytes to mix into the
    /// guest's pool before its generator is reseeded.
    pub entropy: String,
}

/// Why an identity line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not an identity line at all.
    #[error("not an identity line")]
    NotIdentity,
    /// Longer than [`MAX_IDENTITY_LINE`].
    #[error("identity line of {0} bytes is longer than {MAX_IDENTITY_LINE}")]
    TooLong(usize),
    /// Not the JSON of a [`GuestIdentity`].
    #[error("malformed identity: {0}")]
    Malformed(String),
    /// A field out of bounds.
    #[error("invalid identity {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl GuestIdentity {
    /// The console line (newline included).
    pub fn to_line(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{IDENTITY_PREFIX}{json}\n")
    }

    /// Parses and checks one console line (with or without its line end).
    pub fn from_line(line: &[u8]) -> Result<GuestIdentity, IdentityError> {
        let line = line.trim_ascii();
        if line.len() > MAX_IDENTITY_LINE {
            return Err(IdentityError::TooLong(line.len()));
        }
        let body = line
            .strip_prefix(IDENTITY_PREFIX.trim_end().as_bytes())
            .ok_or(IdentityError::NotIdentity)?
            .trim_ascii();
        let id: GuestIdentity =
            serde_json::from_slice(body).map_err(|e| IdentityError::Malformed(e.to_string()))?;
        id.validate()?;
        Ok(id)
    }

    /// The MAC as six bytes.
    pub fn mac_bytes(&self) -> Result<[u8; 6], IdentityError> {
        let bad = IdentityError::Invalid {
            field: "mac",
            reason: "must be six ':'-separated hex octets",
        };
        let mut out = [0u8; 6];
        let mut parts = self.mac.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or(bad.clone())?;
            if p.len() != 2 {
                return Err(bad);
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad.clone())?;
        }
        if parts.next().is_some() {
            return Err(bad);
        }
        Ok(out)
    }

    /// The entropy as bytes.
    pub fn entropy_bytes(&self) -> Result<Vec<u8>, IdentityError> {
        let e = hex::decode(&self.entropy).map_err(|_| IdentityError::Invalid {
            field: "entropy",
            reason: "must be hex",
        })?;
        if e.len() != IDENTITY_ENTROPY_BYTES {
            return Err(IdentityError::Invalid {
                field: "entropy",
                reason: "must be 64 bytes",
            });
        }
        Ok(e)
    }

    /// Checks every field against the same rules as the config drive's.
    pub fn validate(&self) -> Result<(), IdentityError> {
        let drive = crate::config_drive::ConfigDrive {
            hostname: self.hostname.clone(),
            token: self.token.clone(),
            env: Default::default(),
            files: Vec::new(),
            init: None,
            volumes: Vec::new(),
            exec_defaults: None,
            agent_as_root: false,
        };
        if let Err(e) = drive.validate() {
            return Err(IdentityError::Invalid {
                field: "token or hostname",
                reason: match e {
                    crate::config_drive::ConfigDriveError::Invalid { reason, .. } => reason,
                    _ => "invalid",
                },
            });
        }
        if !(1..=30).contains(&self.prefix) {
            return Err(IdentityError::Invalid {
                field: "prefix",
                reason: "must be 1..=30",
            });
        }
        let mac = self.mac_bytes()?;
        if mac[0] & 1 == 1 {
            return Err(IdentityError::Invalid {
                field: "mac",
                reason: "must be unicast",
            });
        }
        self.entropy_bytes()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> GuestIdentity {
        GuestIdentity {
            token: "0123456789abcdef0123".into(),
            hostname: "child-1".into(),
            ip: "10.200.0.7".parse().unwrap(),
            prefix: 24,
            gateway: "10.200.0.1".parse().unwrap(),
            mac: "02:b4:0a:c8:00:07".into(),
            unix_ms: 1_800_000_000_000,
            entropy: "ab".repeat(IDENTITY_ENTROPY_BYTES),
        }
    }

    #[test]
    fn a_line_round_trips_and_is_plain_ascii() {
        let line = identity().to_line();
        assert!(line.starts_with(IDENTITY_PREFIX) && line.ends_with('\n'));
        assert!(line
            .bytes()
            .all(|b| b == b'\n' || (0x20..0x7f).contains(&b)));
        assert_eq!(
            GuestIdentity::from_line(line.as_bytes()).unwrap(),
            identity()
        );
        // A terminal may hand it over with a carriage return.
        let crlf = line.trim_end().to_string() + "\r\n";
        assert_eq!(
            GuestIdentity::from_line(crlf.as_bytes()).unwrap(),
            identity()
        );
        assert_eq!(identity().mac_bytes().unwrap(), [2, 0xb4, 10, 0xc8, 0, 7]);
    }

    #[test]
    fn bad_lines_are_refused() {
        assert_eq!(
            GuestIdentity::from_line(b"hello"),
            Err(IdentityError::NotIdentity)
        );
        let long = format!("{IDENTITY_PREFIX}{}", "0".repeat(MAX_IDENTITY_LINE));
        assert!(matches!(
            GuestIdentity::from_line(long.as_bytes()),
            Err(IdentityError::TooLong(_))
        ));
        assert!(matches!(
            GuestIdentity::from_line(format!("{IDENTITY_PREFIX}zz").as_bytes()),
            Err(IdentityError::Malformed(_))
        ));
        let mut id = identity();
        id.token = "short".into();
        assert!(GuestIdentity::from_line(id.to_line().as_bytes()).is_err());
        let mut id = identity();
        id.mac = "03:00:00:00:00:01".into();
        assert!(GuestIdentity::from_line(id.to_line().as_bytes()).is_err());
        let mut id = identity();
        id.entropy = "ab".into();
        assert!(GuestIdentity::from_line(id.to_line().as_bytes()).is_err());
        let mut id = identity();
        id.prefix = 0;
        assert!(GuestIdentity::from_line(id.to_line().as_bytes()).is_err());
        let unknown = format!("{IDENTITY_PREFIX}{}", r#"{"x":1}"#);
        assert!(GuestIdentity::from_line(unknown.as_bytes()).is_err());
    }
}
