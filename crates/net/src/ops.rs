//! [`NetOps`]: the privileged operations bhatti needs from the host's
//! network stack, behind one small trait so the logic above it
//! ([`crate::Network`]) is testable without root ([`crate::fake`]) and the
//! real implementation ([`crate::IpRoute`]) is tested for real inside a
//! test-made network namespace.
//!
//! Every call blocks (it runs a short-lived process or a syscall); async
//! callers use `spawn_blocking`.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::error::Result;
use crate::guard::TapGuard;
use crate::subnet::Mac;

/// Privileged network operations, all in the caller's network namespace.
pub trait NetOps: Send + Sync + fmt::Debug {
    /// Creates bridge `name` (or adopts an existing bridge of that name),
    /// gives it the fixed `mac` (so it never changes as ports come and go,
    /// which would leave stale neighbour entries in guests), the address
    /// `addr/prefix`, and sets it up. The bridge has no IPv6 (disabled
    /// before it comes up, so it never gets a link-local address), strict
    /// reverse-path filtering, and answers ARP only for its own address.
    fn create_bridge(&self, name: &str, mac: Mac, addr: Ipv4Addr, prefix: u8) -> Result<()>;

    /// Creates a persistent TAP `name` that user `owner_uid` (the VMM) may
    /// open, attaches it to `bridge`, and sets it up, with IPv6 disabled
    /// before it comes up.
    fn create_tap(&self, name: &str, owner_uid: u32, bridge: &str) -> Result<()>;

    /// Sets a link's MAC (when given) and brings it up.
    fn set_link_up(&self, name: &str, mac: Option<Mac>) -> Result<()>;

    /// Deletes a link. `Ok(false)` when there was no such link.
    fn delete_link(&self, name: &str) -> Result<bool>;

    /// The names of the links starting with `prefix`, sorted.
    fn list_links(&self, prefix: &str) -> Result<Vec<String>>;

    /// Pre-seeds a permanent neighbour (ARP) entry `ip → mac` on `dev`, so
    /// the first packet to a new guest does not wait for ARP resolution.
    fn set_neighbour(&self, dev: &str, ip: Ipv4Addr, mac: Mac) -> Result<()>;

    /// Removes the neighbour entry for `ip` on `dev`. `Ok(false)` when
    /// there was none.
    fn delete_neighbour(&self, dev: &str, ip: Ipv4Addr) -> Result<bool>;

    /// Installs or replaces the guard of a TAP ([`crate::guard`]): the
    /// frames it may send. Atomic: the old rules hold until the new ones do.
    fn guard_tap(&self, guard: &TapGuard) -> Result<()>;

    /// Lets a TAP's guest reach `addrs` for the time given with each (the
    /// `d_` set of its guard, [`crate::guard::learn_script`]); an address
    /// already there gets the new time. The TAP must be guarded.
    fn allow_learned(&self, tap: &str, addrs: &[(Ipv4Addr, Duration)]) -> Result<()>;

    /// Removes a TAP's guard (harmless when there is none).
    fn unguard_tap(&self, tap: &str) -> Result<()>;
}
