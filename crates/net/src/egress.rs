//! A sandbox's egress policy ([`Egress`]): where it may send IPv4, on top
//! of the daemon's firewall; its allow-list entries ([`AllowEntry`]:
//! prefixes, addresses, host names and `*.` wildcards); and
//! [`NameSets`], which turns the answers the gateway's DNS relay gives a
//! sandbox for names on its list into short-lived entries of that
//! sandbox's TAP guard.
//!
//! Names are enforced by what the guest is told: when the relay forwards a
//! sandbox's A query for a listed name and the upstream answers, the
//! answer's addresses go into the sandbox's set (nftables, with a timeout
//! of the record's TTL clamped to [`MIN_TTL`]..[`MAX_TTL`]) before the
//! guest gets the answer, so its first packet finds the door open. Nothing
//! else adds to the set: an address the guest found elsewhere (its own
//! resolver, a hard-coded IP) stays closed unless a prefix lists it.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cidr::{Cidr, CidrError};
use crate::error::Result;
use crate::ops::NetOps;

/// Most entries an allow-list may hold.
pub const MAX_ALLOW_ENTRIES: usize = 64;
/// Shortest time an address learned from a DNS answer stays allowed.
pub const MIN_TTL: Duration = Duration::from_secs(30);
/// Longest time an address learned from a DNS answer stays allowed
/// without being resolved again.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// Most addresses learned for one sandbox at a time; beyond, answers still
/// reach the guest but their new addresses are not allowed.
pub const MAX_LEARNED: usize = 1024;

/// Where a sandbox may send IPv4, on top of the daemon's firewall. In JSON:
/// `"public"`, `"none"` or `{"allow": ["10.1.2.0/24", "api.example.com"]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Whatever the firewall allows (the public internet, its siblings,
    /// DNS and ping to its gateway).
    #[default]
    Public,
    /// Only its gateway (DNS, ping).
    None,
    /// Only its gateway, these prefixes, and the addresses the gateway's
    /// DNS gave it for these names (still subject to the firewall).
    Allow(Vec<AllowEntry>),
}

impl Egress {
    /// Whether this is [`Egress::Public`].
    pub fn is_public(&self) -> bool {
        matches!(self, Egress::Public)
    }

    /// The prefixes of an allow-list (none for other policies).
    pub fn cidrs(&self) -> Vec<Cidr> {
        match self {
            Egress::Allow(list) => list
                .iter()
                .filter_map(|e| match e {
                    AllowEntry::Cidr(c) => Some(*c),
                    AllowEntry::Name(_) => None,
                })
                .collect(),
            Egress::Public | Egress::None => Vec::new(),
        }
    }

    /// The names of an allow-list (none for other policies).
    pub fn names(&self) -> Vec<NamePattern> {
        match self {
            Egress::Allow(list) => list
                .iter()
                .filter_map(|e| match e {
                    AllowEntry::Name(n) => Some(n.clone()),
                    AllowEntry::Cidr(_) => None,
                })
                .collect(),
            Egress::Public | Egress::None => Vec::new(),
        }
    }

    /// Parses and checks an allow-list as a user wrote it: at most
    /// [`MAX_ALLOW_ENTRIES`] entries, each a prefix, an address or a name.
    pub fn allow<S: AsRef<str>>(entries: &[S]) -> std::result::Result<Egress, EgressError> {
        if entries.len() > MAX_ALLOW_ENTRIES {
            return Err(EgressError::TooMany {
                got: entries.len(),
                max: MAX_ALLOW_ENTRIES,
            });
        }
        let mut list: Vec<AllowEntry> = Vec::with_capacity(entries.len());
        for e in entries {
            let entry: AllowEntry = e.as_ref().parse()?;
            if !list.contains(&entry) {
                list.push(entry);
            }
        }
        Ok(Egress::Allow(list))
    }
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Egress::Public => f.write_str("public"),
            Egress::None => f.write_str("none"),
            Egress::Allow(list) => {
                f.write_str("allow ")?;
                let parts: Vec<String> = list.iter().map(ToString::to_string).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// Why an egress policy was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// More than [`MAX_ALLOW_ENTRIES`] entries.
    #[error("an allow-list holds at most {max} entries, got {got}")]
    TooMany {
        /// Entries given.
        got: usize,
        /// The bound.
        max: usize,
    },
    /// A prefix or address that does not parse.
    #[error("allow entry {entry:?}: {source}")]
    Cidr {
        /// The entry.
        entry: String,
        /// Why.
        source: CidrError,
    },
    /// Something that is neither a prefix nor a valid host name.
    #[error("allow entry {entry:?}: {reason}")]
    Invalid {
        /// The entry.
        entry: String,
        /// Why.
        reason: &'static str,
    },
}

/// One entry of an allow-list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AllowEntry {
    /// A prefix (a bare address is a /32).
    Cidr(Cidr),
    /// A host name, or every name under a domain.
    Name(NamePattern),
}

impl FromStr for AllowEntry {
    type Err = EgressError;
    fn from_str(s: &str) -> std::result::Result<AllowEntry, EgressError> {
        let invalid = |reason| EgressError::Invalid {
            entry: s.to_owned(),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("empty entry"));
        }
        if s.contains(':') {
            return Err(invalid(
                "IPv6 is not supported (sandboxes have IPv4 only); use an IPv4 address, prefix or host name",
            ));
        }
        // Anything made of digits, dots and a slash is meant as an address.
        if s.bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/')
        {
            return s
                .parse()
                .map(AllowEntry::Cidr)
                .map_err(|source| EgressError::Cidr {
                    entry: s.to_owned(),
                    source,
                });
        }
        NamePattern::parse(s).map(AllowEntry::Name).map_err(invalid)
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A single address is shown as given, without `/32`.
            AllowEntry::Cidr(c) if c.prefix() == 32 => write!(f, "{}", c.addr()),
            AllowEntry::Cidr(c) => write!(f, "{c}"),
            AllowEntry::Name(n) => write!(f, "{n}"),
        }
    }
}

impl TryFrom<String> for AllowEntry {
    type Error = EgressError;
    fn try_from(s: String) -> std::result::Result<AllowEntry, EgressError> {
        s.parse()
    }
}

impl From<AllowEntry> for String {
    fn from(e: AllowEntry) -> String {
        e.to_string()
    }
}

/// A host name (`api.example.com`) or a wildcard (`*.example.org`: every
/// name under example.org, not example.org itself). Lower case, without
/// the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamePattern {
    /// The name, or the domain under a wildcard.
    base: String,
    wildcard: bool,
}

impl NamePattern {
    /// Checks a name as a user wrote it: letters, digits and `-` in labels
    /// of 1..=63 bytes not starting or ending with `-`, at most 253 bytes,
    /// at least two labels, a last label that is not all digits; `*` only
    /// as a whole leading label (`*.example.org`).
    pub fn parse(s: &str) -> std::result::Result<NamePattern, &'static str> {
        let lower = s.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        let (wildcard, base) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        if base.contains('*') {
            return Err("a wildcard is only allowed as a leading '*.' (as in *.example.org)");
        }
        if base.is_empty() {
            return Err("empty name");
        }
        if base.len() > 253 {
            return Err("a name is at most 253 bytes");
        }
        let labels: Vec<&str> = base.split('.').collect();
        for l in &labels {
            if l.is_empty() || l.len() > 63 {
                return Err("each label of a name is 1 to 63 bytes (no empty labels)");
            }
            if !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err("a name holds only letters, digits, '-' and '.'");
            }
            if l.starts_with('-') || l.ends_with('-') {
                return Err("a label of a name does not start or end with '-'");
            }
        }
        if labels.len() < 2 {
            return Err("a name needs a domain (at least two labels, as in example.com)");
        }
        if labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(
                "not an IPv4 address or prefix (a.b.c.d or a.b.c.d/0..32), nor a host name",
            );
        }
        Ok(NamePattern {
            base: base.to_owned(),
            wildcard,
        })
    }

    /// Whether `name` (lower case, no trailing dot, as the DNS parser
    /// gives it) is this name or, for a wildcard, under its domain.
    pub fn matches(&self, name: &str) -> bool {
        if self.wildcard {
            name.len() > self.base.len() + 1
                && name.ends_with(&self.base)
                && name.as_bytes()[name.len() - self.base.len() - 1] == b'.'
        } else {
            name == self.base
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.base)
    }
}

/// The TTL an address learned from an answer gets: `ttl` seconds,
/// clamped to [`MIN_TTL`]..=[`MAX_TTL`].
pub fn clamp_ttl(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl)).clamp(MIN_TTL, MAX_TTL)
}

/// One sandbox's names and what was learned for them.
#[derive(Debug)]
struct Entry {
    tap: String,
    names: Vec<NamePattern>,
    /// Learned address → (the name it answered, when it expires).
    learned: HashMap<Ipv4Addr, (String, Instant)>,
}

/// Every sandbox's name allow-list, by guest address, and the addresses
/// the DNS relay learned for them. One per daemon, shared by its networks
/// (which register and forget sandboxes as their TAPs are guarded and
/// removed) and the relay (which asks and learns).
#[derive(Debug)]
pub struct NameSets {
    ops: Arc<dyn NetOps>,
    /// Held only for lookups and bookkeeping, never across `nft`: the
    /// relay's [`NameSets::wants`] runs on the async runtime.
    entries: Mutex<HashMap<Ipv4Addr, Entry>>,
    /// Held across every `nft` write (guards and learned addresses), so an
    /// address learned while a guard is replaced is neither lost nor kept
    /// past a narrowing.
    writes: Mutex<()>,
}

impl NameSets {
    /// An empty registry whose learned addresses go through `ops`.
    pub fn new(ops: Arc<dyn NetOps>) -> NameSets {
        NameSets {
            ops,
            entries: Mutex::new(HashMap::new()),
            writes: Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Ipv4Addr, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the relay may ask the upstream for `name` on behalf of
    /// `client`: always under `public` (no entry), never under `none`, and
    /// under an allow-list only for a name it lists — so the resolver is no
    /// channel out of a sandbox whose egress is closed (a query's name is
    /// data that reaches whoever serves its domain).
    pub fn may_resolve(&self, client: Ipv4Addr, name: &str) -> bool {
        match self.lock().get(&client) {
            None => true,
            Some(e) => e.names.iter().any(|n| n.matches(name)),
        }
    }

    /// Whether the relay is to learn the answer to `client`'s query for
    /// `name`: the client's policy lists a name matching it.
    pub fn wants(&self, client: Ipv4Addr, name: &str) -> bool {
        self.lock()
            .get(&client)
            .is_some_and(|e| e.names.iter().any(|n| n.matches(name)))
    }

    /// Installs (through `guard`, given the addresses still learned for
    /// names the new policy keeps, with their remaining time) the guard of
    /// the sandbox at `ip` on `tap` with `egress`, and records its names.
    /// No address is learned while the guard is replaced. Blocks.
    pub(crate) fn apply(
        &self,
        ip: Ipv4Addr,
        tap: &str,
        egress: &Egress,
        guard: impl FnOnce(Vec<(Ipv4Addr, Duration)>) -> Result<()>,
    ) -> Result<()> {
        let _writing = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let names = egress.names();
        let now = Instant::now();
        let kept: HashMap<Ipv4Addr, (String, Instant)> = match self.lock().get(&ip) {
            Some(e) if e.tap == tap => e
                .learned
                .iter()
                .filter(|(_, (name, until))| {
                    *until > now + Duration::from_secs(1) && names.iter().any(|n| n.matches(name))
                })
                .map(|(a, v)| (*a, v.clone()))
                .collect(),
            _ => HashMap::new(),
        };
        let learned: Vec<(Ipv4Addr, Duration)> = kept
            .iter()
            .map(|(a, (_, until))| (*a, until.saturating_duration_since(now)))
            .collect();
        guard(learned)?;
        let mut entries = self.lock();
        if egress.is_public() {
            entries.remove(&ip);
        } else {
            entries.insert(
                ip,
                Entry {
                    tap: tap.to_owned(),
                    names,
                    learned: kept,
                },
            );
        }
        Ok(())
    }

    /// Forgets the sandbox at `ip` (its TAP is gone).
    pub fn forget(&self, ip: Ipv4Addr) {
        self.lock().remove(&ip);
    }

    /// Allows `client` to reach `addrs` (each with its record's TTL in
    /// seconds), learned from the answer to its query for `name`, if its
    /// policy still lists that name. Addresses already allowed for at
    /// least half the new time are not written again. Returns how many
    /// addresses were written. Blocks (runs `nft`).
    pub fn learn(&self, client: Ipv4Addr, name: &str, addrs: &[(Ipv4Addr, u32)]) -> Result<usize> {
        let _writing = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tap, fresh) = {
            let mut entries = self.lock();
            let Some(e) = entries.get_mut(&client) else {
                return Ok(0);
            };
            if !e.names.iter().any(|n| n.matches(name)) {
                return Ok(0);
            }
            e.learned.retain(|_, (_, until)| *until > now);
            (e.tap.clone(), to_write(e, &client, addrs, now))
        };
        if fresh.is_empty() {
            return Ok(0);
        }
        self.ops.allow_learned(&tap, &fresh)?;
        // Not changed meanwhile (a change writes too), or forgotten (its
        // TAP is gone).
        if let Some(e) = self.lock().get_mut(&client) {
            for (addr, ttl) in &fresh {
                e.learned.insert(*addr, (name.to_owned(), now + *ttl));
            }
        }
        Ok(fresh.len())
    }

    /// The addresses learned for the sandbox at `ip` and not expired.
    pub fn learned(&self, ip: Ipv4Addr) -> Vec<Ipv4Addr> {
        let now = Instant::now();
        let mut v: Vec<Ipv4Addr> = self
            .lock()
            .get(&ip)
            .map(|e| {
                e.learned
                    .iter()
                    .filter(|(_, (_, until))| *until > now)
                    .map(|(a, _)| *a)
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// The addresses of `addrs` to write for `e`: not known for at least half
/// their new time, within [`MAX_LEARNED`], each once, with clamped TTLs.
fn to_write(
    e: &Entry,
    client: &Ipv4Addr,
    addrs: &[(Ipv4Addr, u32)],
    now: Instant,
) -> Vec<(Ipv4Addr, Duration)> {
    let mut fresh: Vec<(Ipv4Addr, Duration)> = Vec::new();
    for (addr, ttl) in addrs {
        let ttl = clamp_ttl(*ttl);
        let known = e.learned.get(addr).map(|(_, until)| *until);
        if known.is_some_and(|until| until >= now + ttl / 2) {
            continue;
        }
        if known.is_none() && e.learned.len() + fresh.len() >= MAX_LEARNED {
            tracing::warn!(%client, %addr, "too many learned addresses; not allowing more");
            continue;
        }
        if !fresh.iter().any(|(a, _)| a == addr) {
            fresh.push((*addr, ttl));
        }
    }
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_as_prefixes_addresses_or_names() {
        let e = Egress::allow(&[
            "10.1.2.0/24",
            "203.0.113.7",
            "API.Example.com.",
            "*.example.org",
            "203.0.113.7",
        ])
        .unwrap();
        assert_eq!(
            e.to_string(),
            "allow 10.1.2.0/24,203.0.113.7,api.example.com,*.example.org"
        );
        assert_eq!(e.cidrs().len(), 2);
        assert_eq!(e.names().len(), 2);
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"allow":["10.1.2.0/24","203.0.113.7","api.example.com","*.example.org"]}"#
        );
        assert_eq!(serde_json::from_str::<Egress>(&json).unwrap(), e);
        assert_eq!(serde_json::to_string(&Egress::None).unwrap(), r#""none""#);
        assert_eq!(
            serde_json::from_str::<Egress>(r#""public""#).unwrap(),
            Egress::Public
        );
        assert!(serde_json::from_str::<Egress>(r#"{"allow":["*"]}"#).is_err());
    }

    #[test]
    fn bad_entries_say_why() {
        for (bad, says) in [
            ("10.1.2.5/24", "host bits"),
            ("10.1.2.0/33", "not an IPv4"),
            ("10.1.2", "not an IPv4"),
            ("2001:db8::1", "IPv6"),
            ("*", "wildcard"),
            ("a.*.example.org", "wildcard"),
            ("*example.org", "wildcard"),
            ("localhost", "two labels"),
            ("exa_mple.com", "letters, digits"),
            ("-a.example.com", "'-'"),
            ("a..example.com", "1 to 63"),
            ("", "empty"),
            ("ex ample.com", "letters, digits"),
        ] {
            let e = Egress::allow(&[bad]).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(Egress::allow(&[long]).is_err());
        let many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
        assert!(Egress::allow(&many)
            .unwrap_err()
            .to_string()
            .contains("at most 64"));
        assert!(Egress::allow(&many[..64]).is_ok());
    }

    #[test]
    fn wildcards_match_names_under_their_domain_only() {
        let w = NamePattern::parse("*.example.org").unwrap();
        assert!(w.matches("a.example.org"));
        assert!(w.matches("a.b.example.org"));
        assert!(!w.matches("example.org"));
        assert!(!w.matches("badexample.org"));
        assert!(!w.matches("example.org.evil.com"));
        let n = NamePattern::parse("api.example.com").unwrap();
        assert!(n.matches("api.example.com"));
        assert!(!n.matches("x.api.example.com"));
    }

    #[test]
    fn ttls_are_clamped() {
        assert_eq!(clamp_ttl(0), MIN_TTL);
        assert_eq!(clamp_ttl(300), Duration::from_secs(300));
        assert_eq!(clamp_ttl(u32::MAX), MAX_TTL);
    }

    #[test]
    fn only_listed_names_are_learned_and_narrowing_forgets() {
        let ops = Arc::new(crate::fake::FakeNetOps::default());
        let sets = NameSets::new(ops.clone());
        let ip: Ipv4Addr = "10.7.0.2".parse().unwrap();
        let pub1: Ipv4Addr = "203.0.113.10".parse().unwrap();
        let pub2: Ipv4Addr = "203.0.113.20".parse().unwrap();
        let list = Egress::allow(&["api.test", "*.cdn.test"]).unwrap();
        let guard = |egress: &Egress| crate::TapGuard {
            tap: "tt0".into(),
            mac: crate::Mac::for_ip(ip),
            ip,
            gateway: "10.7.0.1".parse().unwrap(),
            egress: egress.clone(),
            learned: Vec::new(),
        };
        sets.apply(ip, "tt0", &list, |l| {
            assert!(l.is_empty());
            ops.guard_tap(&guard(&list))
        })
        .unwrap();
        assert!(sets.wants(ip, "api.test") && sets.wants(ip, "x.cdn.test"));
        assert!(!sets.wants(ip, "other.test"));
        assert!(!sets.wants("10.7.0.3".parse().unwrap(), "api.test"));
        assert_eq!(sets.learn(ip, "other.test", &[(pub2, 60)]).unwrap(), 0);
        assert_eq!(
            sets.learn(ip, "api.test", &[(pub1, 60), (pub1, 60)])
                .unwrap(),
            1
        );
        assert_eq!(ops.learned("tt0"), vec![(pub1, Duration::from_secs(60))]);
        // Known for long enough: not written again.
        assert_eq!(sets.learn(ip, "api.test", &[(pub1, 60)]).unwrap(), 0);
        assert_eq!(sets.learn(ip, "x.cdn.test", &[(pub2, 5)]).unwrap(), 1);
        assert_eq!(sets.learned(ip), vec![pub1, pub2]);
        // Re-applied without the wildcard: only api.test's address is kept.
        let narrower = Egress::allow(&["api.test"]).unwrap();
        sets.apply(ip, "tt0", &narrower, |l| {
            assert_eq!(l.iter().map(|(a, _)| *a).collect::<Vec<_>>(), vec![pub1]);
            assert!(l[0].1 <= Duration::from_secs(60));
            Ok(())
        })
        .unwrap();
        assert_eq!(sets.learned(ip), vec![pub1]);
        assert!(sets.may_resolve(ip, "api.test") && !sets.may_resolve(ip, "x.cdn.test"));
        // No names left: nothing learned, nothing resolved.
        sets.apply(ip, "tt0", &Egress::None, |_| Ok(())).unwrap();
        assert!(!sets.wants(ip, "api.test"));
        assert!(!sets.may_resolve(ip, "api.test"));
        assert_eq!(sets.learn(ip, "api.test", &[(pub1, 60)]).unwrap(), 0);
        // Public again: every name resolves, none is learned.
        sets.apply(ip, "tt0", &Egress::Public, |_| Ok(())).unwrap();
        assert!(sets.may_resolve(ip, "anything.test"));
        assert!(!sets.wants(ip, "api.test"));
        // A sandbox never registered is public.
        assert!(sets.may_resolve("10.7.0.9".parse().unwrap(), "anything.test"));
    }
}
